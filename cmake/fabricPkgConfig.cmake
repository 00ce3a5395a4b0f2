# Writes fabric.pc for pkg-config users. LibTorch ships no pkg-config file, so its flags are taken from
# the Torch this build found: its include directories, compile definitions and libraries (by their
# targets' files; the CMake package, by contrast, names only LibTorch's targets). fmt comes through its
# own fmt.pc, or as header-only fmt where Torch bundles its own (the PyTorch wheel). The file is
# relocatable: its prefix is found from where it lies.

set(fabric_pc_cflags "-std=c++20")
foreach(dir IN LISTS TORCH_INCLUDE_DIRS)
  # NOTE: the compiler's own directories (/usr/include) must not be repeated with -I: it breaks #include_next.
  if(NOT dir IN_LIST CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES)
    string(APPEND fabric_pc_cflags " -I${dir}")
  endif()
endforeach()
get_target_property(fabric_torch_defs torch_cpu INTERFACE_COMPILE_DEFINITIONS)
foreach(def IN LISTS fabric_torch_defs)
  if(def AND NOT def MATCHES "\\$<")
    string(APPEND fabric_pc_cflags " -D${def}")
  endif()
endforeach()
if(TORCH_CXX_FLAGS)
  string(APPEND fabric_pc_cflags " ${TORCH_CXX_FLAGS}")
endif()
set(fabric_pc_requires "")
if(FABRIC_FMT_TARGET STREQUAL "fmt::fmt-header-only")
  string(APPEND fabric_pc_cflags " -DFMT_HEADER_ONLY=1")
else()
  set(fabric_pc_requires "fmt")
endif()

# NOTE: libstdc++ first (see FABRIC_LIBSTDCXX); LibTorch's operator libraries are linked whole
# (--no-as-needed), as Torch's own CMake targets do, since they register their kernels at load time.
set(fabric_torch_libdir "$<TARGET_LINKER_FILE_DIR:torch_cpu>")
set(fabric_implicit_libdirs "${CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES}")
set(fabric_pc_libs "-lstdc++$<$<NOT:$<IN_LIST:${fabric_torch_libdir},${fabric_implicit_libdirs}>>: -L${fabric_torch_libdir} -Wl,-rpath,${fabric_torch_libdir}>")
string(APPEND fabric_pc_libs " -Wl,--push-state,--no-as-needed -ltorch -ltorch_cpu")
if(TARGET torch_cuda)
  string(APPEND fabric_pc_libs " -ltorch_cuda")
endif()
string(APPEND fabric_pc_libs " -Wl,--pop-state -lc10")
if(TARGET c10_cuda)
  string(APPEND fabric_pc_libs " -lc10_cuda")
endif()
string(APPEND fabric_pc_libs " -pthread")  # TensorBoardLogger's flush timer

file(GENERATE OUTPUT ${CMAKE_CURRENT_BINARY_DIR}/fabric.pc CONTENT "prefix=\${pcfiledir}/../..
includedir=\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}

Name: fabric
Description: ${PROJECT_DESCRIPTION}
Version: ${PROJECT_VERSION}
Requires: ${fabric_pc_requires}
Cflags: -I\${includedir} ${fabric_pc_cflags}
Libs: ${fabric_pc_libs}
")
