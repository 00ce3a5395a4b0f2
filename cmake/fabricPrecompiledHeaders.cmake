# fabric_precompile_headers(<target> [DISTRIBUTED])
#
# Gives a target of yours a precompiled header of <torch/torch.h> and fabric (fabric/fabric.hpp, or also
# fabric/distributed.hpp with DISTRIBUTED), so that each of its translation units stops parsing them. With
# several targets, call it for one and give the others `target_precompile_headers(other REUSE_FROM one)`.
#
#     find_package(fabric 0.1 REQUIRED)            # or add_subdirectory(fabric)
#     add_executable(train train.cpp)
#     target_link_libraries(train PRIVATE fabric::fabric)
#     fabric_precompile_headers(train)
function(fabric_precompile_headers target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "DISTRIBUTED" "" "")
  if(NOT TARGET ${target})
    message(FATAL_ERROR "fabric_precompile_headers: expected a target, found \"${target}\"; create it first")
  endif()
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "fabric_precompile_headers: unknown arguments ${arg_UNPARSED_ARGUMENTS}; expected "
                        "DISTRIBUTED")
  endif()
  set(headers <torch/torch.h> <fabric/fabric.hpp>)
  if(arg_DISTRIBUTED)
    list(APPEND headers <fabric/distributed.hpp>)
  endif()
  target_precompile_headers(${target} PRIVATE ${headers})
endfunction()
