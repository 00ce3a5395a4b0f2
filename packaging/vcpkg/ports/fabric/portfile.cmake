# Overlay port of fabric, a header-only C++20 training library for LibTorch.
#   vcpkg install fabric --overlay-ports=<checkout>/packaging/vcpkg/ports
# docs/packaging.md describes its use and what packaging/CMakeLists.txt tests of it.

set(VCPKG_BUILD_TYPE release) # header-only port: one configuration is enough

# Where the sources come from. fabric has no public release yet, so two ways:
#  1. FABRIC_SOURCE_PATH, a local checkout used as it is: a CMake variable set in a (custom) triplet
#     file, or an environment variable that vcpkg is told to keep (VCPKG_KEEP_ENV_VARS=FABRIC_SOURCE_PATH).
#     vcpkg does not hash the checkout into the package's ABI: after changing the sources, reinstall
#     with `vcpkg remove fabric` first, or with --no-binarycaching.
#  2. Otherwise a pinned commit of the project's GitHub repository (what vcpkg documents for projects
#     without releases: REF is the full commit id, SHA512 that of GitHub's archive of it). Both are
#     placeholders until the repository is public; `--head` builds HEAD_REF instead.
set(FABRIC_GITHUB_REPO "OWNER/fabric")                       # placeholder
set(FABRIC_GITHUB_REF "0000000000000000000000000000000000000000") # placeholder: a full commit id
set(FABRIC_GITHUB_SHA512 0)                                  # placeholder: vcpkg prints the right one

if(NOT DEFINED FABRIC_SOURCE_PATH AND DEFINED ENV{FABRIC_SOURCE_PATH})
  set(FABRIC_SOURCE_PATH "$ENV{FABRIC_SOURCE_PATH}")
endif()
if(DEFINED FABRIC_SOURCE_PATH)
  file(TO_CMAKE_PATH "${FABRIC_SOURCE_PATH}" SOURCE_PATH)
  if(NOT EXISTS "${SOURCE_PATH}/CMakeLists.txt" OR NOT EXISTS "${SOURCE_PATH}/include/fabric/fabric.hpp")
    message(FATAL_ERROR "FABRIC_SOURCE_PATH='${FABRIC_SOURCE_PATH}' is not a fabric checkout "
                        "(no CMakeLists.txt and include/fabric/fabric.hpp there)")
  endif()
  message(STATUS "fabric: using the local checkout ${SOURCE_PATH}")
else()
  if(FABRIC_GITHUB_REF MATCHES "^0+$" AND NOT VCPKG_USE_HEAD_VERSION)
    message(FATAL_ERROR "fabric's overlay port has no pinned commit yet: set FABRIC_SOURCE_PATH to a "
                        "checkout (see docs/packaging.md), or fill in FABRIC_GITHUB_REPO/REF/SHA512 in "
                        "${CMAKE_CURRENT_LIST_FILE}")
  endif()
  vcpkg_from_github(
    OUT_SOURCE_PATH SOURCE_PATH
    REPO "${FABRIC_GITHUB_REPO}"
    REF "${FABRIC_GITHUB_REF}"
    SHA512 "${FABRIC_GITHUB_SHA512}"
    HEAD_REF main
  )
endif()

# The features (cuda, dist) only select LibTorch's features in vcpkg.json: fabric's headers find out
# what LibTorch offers when they are compiled, so nothing here depends on them.
vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    -DFABRIC_BUILD_TESTS=OFF
    -DFABRIC_BUILD_EXAMPLES=OFF
    -DFABRIC_BUILD_BENCH=OFF
    -DFABRIC_BUILD_RUN=OFF
    -DFABRIC_INSTALL=ON
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(CONFIG_PATH lib/cmake/fabric)

# A pkg-config file of a header-only library is configuration-independent: share/pkgconfig.
if(EXISTS "${CURRENT_PACKAGES_DIR}/lib/pkgconfig")
  file(GLOB fabric_pc_files "${CURRENT_PACKAGES_DIR}/lib/pkgconfig/*.pc")
  file(MAKE_DIRECTORY "${CURRENT_PACKAGES_DIR}/share/pkgconfig")
  file(COPY ${fabric_pc_files} DESTINATION "${CURRENT_PACKAGES_DIR}/share/pkgconfig")
  file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/lib/pkgconfig")
endif()
vcpkg_fixup_pkgconfig()

# Header-only: what is left of lib/ must be empty directories (the config fixup moved lib/cmake away).
file(GLOB_RECURSE fabric_lib_files "${CURRENT_PACKAGES_DIR}/lib/*")
if(fabric_lib_files)
  message(FATAL_ERROR "fabric is header-only, but its install put files in lib/: ${fabric_lib_files}")
endif()
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/lib" "${CURRENT_PACKAGES_DIR}/debug")

file(GLOB fabric_license_files "${SOURCE_PATH}/LICENSE*" "${SOURCE_PATH}/COPYING*")
if(fabric_license_files)
  vcpkg_install_copyright(FILE_LIST ${fabric_license_files})
else()
  # NOTE: the project has not chosen a license yet (vcpkg.json says "license": null).
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright"
       "fabric ${VERSION} ships no license file: ask its authors for the terms of use.\n")
endif()
file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
