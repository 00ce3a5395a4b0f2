# The tests of fabric's torch-free parts, included by tests/CMakeLists.txt; with FABRIC_TORCH_FREE they are
# the only ones (a compiler that cannot compile LibTorch's headers still checks these).

# The torch-free core compiles without LibTorch on the include path.
add_executable(fabric_static_core static/core_static.cpp)
target_include_directories(fabric_static_core PRIVATE ${PROJECT_SOURCE_DIR}/include)
target_link_libraries(fabric_static_core PRIVATE ${FABRIC_FMT_TARGET})
target_compile_features(fabric_static_core PRIVATE cxx_std_20)
add_test(NAME static.core_without_torch COMMAND fabric_static_core)

# The torch-free unit tests: cluster environments from fake environments, the launchers with real child
# processes (launch_worker, fabric-run), the callbacks (the progress bar on a real pty), the rank-zero
# state and the TensorBoard logger.
file(GLOB FABRIC_CORE_TESTS CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/unit/strategies/environments/*_test.cpp
     ${CMAKE_CURRENT_SOURCE_DIR}/unit/strategies/launchers/*_test.cpp ${CMAKE_CURRENT_SOURCE_DIR}/unit/callbacks/*_test.cpp
     ${CMAKE_CURRENT_SOURCE_DIR}/unit/core/*_test.cpp
     ${CMAKE_CURRENT_SOURCE_DIR}/unit/loggers/tensorboard_test.cpp)
add_executable(launch_worker unit/strategies/launchers/launch_worker.cpp)
add_executable(fabric_core_tests ${FABRIC_CORE_TESTS})
foreach(target launch_worker fabric_core_tests)
  target_include_directories(${target} PRIVATE ${PROJECT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_features(${target} PRIVATE cxx_std_20)
  target_link_libraries(${target} PRIVATE ${FABRIC_FMT_TARGET} Threads::Threads)
endforeach()
target_link_libraries(fabric_core_tests PRIVATE Catch2::Catch2WithMain)
target_compile_definitions(fabric_core_tests PRIVATE FABRIC_LAUNCH_WORKER="$<TARGET_FILE:launch_worker>")
add_dependencies(fabric_core_tests launch_worker)
if(TARGET fabric-run)
  target_compile_definitions(fabric_core_tests PRIVATE FABRIC_RUN_EXE="$<TARGET_FILE:fabric-run>")
  add_dependencies(fabric_core_tests fabric-run)
endif()
catch_discover_tests(fabric_core_tests TEST_PREFIX "launch: " DISCOVERY_MODE PRE_TEST
  PROPERTIES ENVIRONMENT "FABRIC_TEST_TMP=${CMAKE_CURRENT_BINARY_DIR}/tmp")


# libFuzzer targets of the torch-free readers (tests/fuzz/; clang only).
option(FABRIC_FUZZ "Build the libFuzzer targets of fabric's torch-free readers (clang with libFuzzer)" OFF)
if(FABRIC_FUZZ)
  add_subdirectory(fuzz)
endif()
