# The resume test: run A trains 2K steps straight; run B trains K steps and saves a checkpoint; run C
# resumes from it and trains to step 2K. The lines C prints for steps K+1..2K (losses to 9 digits) must
# equal A's, bit for bit. The subset of 10 batches per epoch puts the checkpoint mid-epoch, so C has to
# restore the data order (the epoch and the batches used of it) as well as the models, the optimizers and
# the noise generator.
#
#     cmake -DDCGAN=build/examples/dcgan/dcgan -DDIR=/tmp/dcgan-resume -DK=15 -P resume_test.cmake
foreach(var DCGAN DIR K)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "resume_test.cmake: expected -D${var}=..., found none")
  endif()
endforeach()
math(EXPR steps "2 * ${K}")
set(common --seed 7 --train-subset 640 --batch-size 64 --print-every 1 --no-progress)
file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})

function(run name)
  execute_process(COMMAND ${DCGAN} ${common} ${ARGN} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
  file(WRITE ${DIR}/${name}.log "${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "run ${name} (dcgan ${common} ${ARGN}) failed with ${rc}:\n${out}${err}")
  endif()
  # The loss lines of the steps after K, in order.
  string(REGEX MATCHALL "step +[0-9]+  d_loss [^\n]*" lines "${out}")
  set(after "")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "^step +([0-9]+).*" "\\1" n "${line}")
    if(n GREATER ${K})
      list(APPEND after "${line}")
    endif()
  endforeach()
  set(${name}_lines "${after}" PARENT_SCOPE)
endfunction()

run(a --steps ${steps})
run(b --steps ${K} --checkpoint ${DIR}/b.ckpt)
run(c --steps ${steps} --resume ${DIR}/b.ckpt)

list(LENGTH a_lines na)
list(LENGTH c_lines nc)
if(NOT na EQUAL ${K} OR NOT nc EQUAL ${K})
  message(FATAL_ERROR "expected ${K} loss lines after step ${K} in runs A and C, found ${na} and ${nc} (logs in ${DIR})")
endif()
if(NOT a_lines STREQUAL c_lines)
  string(REPLACE ";" "\n" a_text "${a_lines}")
  string(REPLACE ";" "\n" c_text "${c_lines}")
  message(FATAL_ERROR "expected the resumed run to repeat the straight run's steps ${K}+1..${steps} exactly, found\n"
                      "straight:\n${a_text}\nresumed:\n${c_text}")
endif()
list(GET c_lines -1 last)
message(STATUS "resume: steps ${K}+1..${steps} of the resumed run equal the straight run's bit for bit (${last})")
