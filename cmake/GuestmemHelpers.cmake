# Helpers shared by every CMakeLists.txt of the project.

set(GUESTMEM_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wold-style-cast
    -Wcast-align -Woverloaded-virtual -Wimplicit-fallthrough -Wno-missing-field-initializers)

# gm_add_test(<name> SOURCES <files...> [LABELS <labels...>] [TIMEOUT <seconds>]
#             [PROPERTIES <ctest properties...>])
# One GoogleTest program; each TEST becomes its own ctest entry (own process, so a test that
# breaks a mapping or a uffd cannot disturb the next one). PROPERTIES go to every entry (e.g.
# FIXTURES_REQUIRED).
function(gm_add_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;LABELS;LIBS;PROPERTIES" ${ARGN})
  if(NOT GUESTMEM_BUILD_TESTS)
    return()
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE guestmem_testing ${ARG_LIBS})
  target_compile_options(${name} PRIVATE ${GUESTMEM_WARNINGS})
  set(props TIMEOUT ${ARG_TIMEOUT} SKIP_RETURN_CODE 77)
  if(ARG_LABELS)
    list(APPEND props LABELS "${ARG_LABELS}")
  endif()
  list(APPEND props ${ARG_PROPERTIES})
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES ${props})
endfunction()

# gm_add_benchmark(<name> SOURCES <files...>)
function(gm_add_benchmark name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  if(NOT GUESTMEM_BUILD_BENCHMARKS)
    return()
  endif()
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE guestmem benchmark::benchmark ${ARG_LIBS})
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_compile_options(${name} PRIVATE ${GUESTMEM_WARNINGS})
endfunction()
