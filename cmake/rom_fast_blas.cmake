# Selects the BLAS/LAPACK and defines:
#   rom_fast_blas                (INTERFACE target to link)
#   ROM_FAST_BLAS_DEFINITIONS    (symbol mangling / thread control for csrc/src/blas_lapack.hpp)
#   ROM_FAST_BLAS_KIND           (system | scipy-openblas, recorded in the package config)
add_library(rom_fast_blas INTERFACE)
set(ROM_FAST_BLAS_DEFINITIONS "")
if(ROM_FAST_BLAS_ILP64)
  list(APPEND ROM_FAST_BLAS_DEFINITIONS ROM_FAST_BLAS_ILP64)
endif()

set(_kind "${ROM_FAST_BLAS}")
if(_kind STREQUAL "auto")
  if(SKBUILD)
    set(_kind scipy-openblas)   # wheels carry no system dependency
  else()
    find_package(LAPACK QUIET)
    if(LAPACK_FOUND)
      set(_kind system)
    else()
      set(_kind scipy-openblas)
    endif()
  endif()
endif()

if(_kind STREQUAL "system")
  if(ROM_FAST_BLAS_ILP64)
    set(BLA_SIZEOF_INTEGER 8)
  endif()
  find_package(BLAS REQUIRED)
  find_package(LAPACK REQUIRED)
  target_link_libraries(rom_fast_blas INTERFACE LAPACK::LAPACK BLAS::BLAS)
  include(CheckFunctionExists)
  set(CMAKE_REQUIRED_LIBRARIES ${BLAS_LIBRARIES})
  check_function_exists(openblas_set_num_threads ROM_FAST_HAVE_OPENBLAS_THREADS)
  unset(CMAKE_REQUIRED_LIBRARIES)
  if(ROM_FAST_HAVE_OPENBLAS_THREADS)
    list(APPEND ROM_FAST_BLAS_DEFINITIONS ROM_FAST_OPENBLAS_SET_THREADS=openblas_set_num_threads)
  endif()
elseif(_kind STREQUAL "scipy-openblas")
  if(NOT ROM_FAST_SCIPY_OPENBLAS_DIR)
    find_package(Python COMPONENTS Interpreter REQUIRED)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c "import scipy_openblas32, os; print(os.path.dirname(scipy_openblas32.__file__))"
      OUTPUT_VARIABLE _dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "ROM_FAST_BLAS=scipy-openblas: `pip install scipy-openblas32` for ${Python_EXECUTABLE}, "
                          "or pass -DROM_FAST_SCIPY_OPENBLAS_DIR=..., or -DROM_FAST_BLAS=system")
    endif()
    set(ROM_FAST_SCIPY_OPENBLAS_DIR "${_dir}" CACHE PATH "" FORCE)
  endif()
  find_library(ROM_FAST_SCIPY_OPENBLAS_LIB NAMES scipy_openblas
               PATHS "${ROM_FAST_SCIPY_OPENBLAS_DIR}/lib" NO_DEFAULT_PATH REQUIRED)
  # Built against the wheel's library; installed with a copy of it beside librom_fast, so
  # an installed prefix does not depend on the Python environment it was built from.
  get_filename_component(_openblas_name "${ROM_FAST_SCIPY_OPENBLAS_LIB}" NAME)
  target_link_libraries(rom_fast_blas INTERFACE
    "$<BUILD_INTERFACE:${ROM_FAST_SCIPY_OPENBLAS_LIB}>"
    "$<INSTALL_INTERFACE:\${_IMPORT_PREFIX}/${CMAKE_INSTALL_LIBDIR}/${_openblas_name}>")
  install(FILES "${ROM_FAST_SCIPY_OPENBLAS_LIB}" DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT core)
  list(APPEND ROM_FAST_BLAS_DEFINITIONS ROM_FAST_BLAS_PREFIX=scipy_
       ROM_FAST_OPENBLAS_SET_THREADS=scipy_openblas_set_num_threads)
else()
  message(FATAL_ERROR "ROM_FAST_BLAS must be auto, system or scipy-openblas (got '${ROM_FAST_BLAS}')")
endif()
set(ROM_FAST_BLAS_KIND "${_kind}")
message(STATUS "rom_fast: BLAS/LAPACK = ${_kind}")
