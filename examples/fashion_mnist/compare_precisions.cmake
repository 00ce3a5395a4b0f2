# Trains the Fashion-MNIST example twice with the same seed and data, under bf16-mixed and bf16-master,
# and checks that bf16-master reaches a comparable train loss and test accuracy (issue 17).
#     cmake -DEXE=<fashion_mnist> -DARGS="--epochs;1;..." -P compare_precisions.cmake
set(results)
foreach(precision bf16-mixed bf16-master)
  execute_process(COMMAND ${EXE} --accelerator cpu --precision ${precision} --no-progress ${ARGS}
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "fashion_mnist --precision ${precision} failed (${rc}):\n${out}\n${err}")
  endif()
  string(REGEX MATCHALL "train loss [0-9.]+" losses "${out}")
  list(GET losses -1 loss)
  string(REGEX REPLACE "train loss " "" loss "${loss}")
  string(REGEX MATCH "final test accuracy [0-9.]+" accuracy "${out}")
  string(REGEX REPLACE "final test accuracy " "" accuracy "${accuracy}")
  message(STATUS "${precision}: train loss ${loss}, test accuracy ${accuracy}%")
  set(loss_${precision} ${loss})
  set(accuracy_${precision} ${accuracy})
endforeach()
# NOTE: CMake's math() is integer-only: compare in thousandths of the loss and tenths of a percent.
foreach(what loss accuracy)
  foreach(precision bf16-mixed bf16-master)
    string(REGEX REPLACE "^([0-9]+)\\.([0-9]).*" "\\1\\2" v10 "${${what}_${precision}}")
    string(REGEX REPLACE "^([0-9]+)\\.([0-9][0-9][0-9]).*" "\\1\\2" v1000 "${${what}_${precision}}")
    set(${what}_${precision}_10 ${v10})
    set(${what}_${precision}_1000 ${v1000})
  endforeach()
endforeach()
math(EXPR dloss "${loss_bf16-master_1000} - ${loss_bf16-mixed_1000}")
math(EXPR dacc "${accuracy_bf16-mixed_10} - ${accuracy_bf16-master_10}")
if(dloss GREATER 50 OR dacc GREATER 30)
  message(FATAL_ERROR "expected bf16-master within 0.05 of bf16-mixed's train loss and 3 points of its accuracy, "
                      "found ${loss_bf16-master} against ${loss_bf16-mixed} and ${accuracy_bf16-master}% against "
                      "${accuracy_bf16-mixed}%")
endif()
message(STATUS "bf16-master comparable to bf16-mixed")
