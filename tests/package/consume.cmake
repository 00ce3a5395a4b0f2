# Configures, builds and runs the consumer project in one mode; fails on any step.
file(REMOVE_RECURSE ${BINARY})
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE} -B ${BINARY} -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release
                        -DFABRIC_CONSUME=${MODE} -DFABRIC_SOURCE_DIR=${FABRIC} -DCMAKE_PREFIX_PATH=${PREFIX}
                        -DFABRIC_BUILD_TESTS=OFF
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the consumer (${MODE}) failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BINARY} -j2 RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer (${MODE}) failed")
endif()
if(NOT EXECUTABLE)
  set(EXECUTABLE consumer)
endif()
execute_process(COMMAND ${BINARY}/${EXECUTABLE} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the consumer (${MODE}) exited with ${rc}")
endif()
