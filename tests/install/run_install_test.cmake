# Install test: install a built dino tree into a scratch prefix, then configure, build
# and run an outside consumer project against it.
#
#   cmake -DSOURCE_DIR=<dino source> -DBINARY_DIR=<dino build tree>
#         -DWORK_DIR=<scratch dir> [-DCONFIG=<Release|Debug|...>] [-DCXX_COMPILER=<path>]
#         -P tests/install/run_install_test.cmake
#
# CONFIG is only needed for multi-config generators; CXX_COMPILER defaults to the
# compiler CMake finds on its own.
cmake_minimum_required(VERSION 3.25)

foreach(var SOURCE_DIR BINARY_DIR WORK_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "install test: -D${var}=... is required")
  endif()
  get_filename_component(${var} "${${var}}" ABSOLUTE)
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(consumer_src "${SOURCE_DIR}/tests/install/consumer")
set(consumer_bin "${WORK_DIR}/consumer-build")

# Start clean so a stale install never hides a broken one.
file(REMOVE_RECURSE "${prefix}" "${consumer_bin}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# run_step(<step name> <command...>): run a command; stop with its output on failure.
function(run_step step)
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE rc
    OUTPUT_VARIABLE out
    ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(JOIN " " cmd ${ARGN})
    message(FATAL_ERROR "install test: step '${step}' failed (exit ${rc})\n"
      "command: ${cmd}\n--- stdout ---\n${out}\n--- stderr ---\n${err}")
  endif()
  set(step_output "${out}${err}" PARENT_SCOPE)
endfunction()

set(config_args)
if(DEFINED CONFIG AND NOT CONFIG STREQUAL "")
  set(config_args --config "${CONFIG}")
endif()

# 1. install
run_step(install "${CMAKE_COMMAND}" --install "${BINARY_DIR}" --prefix "${prefix}" ${config_args})
if(NOT EXISTS "${prefix}/include/dino/dino.hpp")
  message(FATAL_ERROR "install test: step 'install' did not install include/dino/dino.hpp under ${prefix}")
endif()

# 2. configure the consumer against the prefix only (no package registries).
set(configure_args
  -S "${consumer_src}" -B "${consumer_bin}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
if(DEFINED CONFIG AND NOT CONFIG STREQUAL "")
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
if(DEFINED CXX_COMPILER AND NOT CXX_COMPILER STREQUAL "")
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
run_step("configure consumer" "${CMAKE_COMMAND}" ${configure_args})

# The consumer must have found the installed package, not some other dino.
file(STRINGS "${consumer_bin}/CMakeCache.txt" dino_dir_line REGEX "^dino_DIR:")
string(REGEX REPLACE "^dino_DIR:[A-Z]+=" "" dino_dir "${dino_dir_line}")
file(REAL_PATH "${prefix}" real_prefix)
if(EXISTS "${dino_dir}")
  file(REAL_PATH "${dino_dir}" dino_dir)
endif()
string(FIND "${dino_dir}" "${real_prefix}/" pos)
if(NOT pos EQUAL 0)
  message(FATAL_ERROR "install test: step 'configure consumer' found dino in '${dino_dir}', "
    "not under the install prefix '${real_prefix}'")
endif()

# 3. build the consumer
run_step("build consumer" "${CMAKE_COMMAND}" --build "${consumer_bin}" ${config_args})

# 4. run the consumer and check what it prints.
set(exe "")
foreach(candidate "${consumer_bin}/consumer" "${consumer_bin}/consumer.exe"
                  "${consumer_bin}/${CONFIG}/consumer" "${consumer_bin}/${CONFIG}/consumer.exe")
  if(EXISTS "${candidate}" AND NOT IS_DIRECTORY "${candidate}")
    set(exe "${candidate}")
    break()
  endif()
endforeach()
if(exe STREQUAL "")
  message(FATAL_ERROR "install test: step 'run consumer' found no consumer executable in ${consumer_bin}")
endif()
run_step("run consumer" "${exe}")
string(FIND "${step_output}" "dino " pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "install test: step 'check output' expected \"dino \" in the consumer's output, got:\n${step_output}")
endif()
string(STRIP "${step_output}" step_output)
message(STATUS "install test passed: consumer printed '${step_output}' (dino from ${dino_dir})")
