# Conan 2 recipe of fabric, a header-only C++20 training library for LibTorch.
#   conan create packaging/conan --build=missing
# docs/packaging.md describes its use and what packaging/CMakeLists.txt tests of it.
import glob
import os
import shutil

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.files import copy
from conan.tools.layout import basic_layout

required_conan_version = ">=2.0"


class FabricConan(ConanFile):
    name = "fabric"
    version = "0.1.0"
    description = "Lightning Fabric's way of training, for LibTorch: a header-only C++20 library"
    # NOTE: the project has no license file yet; set its SPDX identifier here once it has one.
    license = None
    homepage = "https://github.com/OWNER/fabric"  # placeholder: the project's repository
    url = homepage
    topics = ("deep-learning", "libtorch", "pytorch", "training", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    no_copy_source = True

    # The recipe lives in packaging/conan/ of the checkout: the sources are two folders up.
    @property
    def _checkout(self):
        return os.path.join(self.recipe_folder, os.pardir, os.pardir)

    def export_sources(self):
        # Only what package() uses: the headers and the license. package() copies the headers instead of
        # running fabric's CMake install (see there), so CMakeLists.txt and cmake/ are not needed, and the
        # single header (single_include/) is for vendoring one file, not for a package manager.
        # (copy() walks all of src: give it include/ itself, not the checkout with its build folders.)
        copy(self, "*", src=os.path.join(self._checkout, "include"),
             dst=os.path.join(self.export_sources_folder, "include"))
        for license_file in glob.glob(os.path.join(self._checkout, "LICENSE*")):
            shutil.copy2(license_file, self.export_sources_folder)

    def layout(self):
        # "." because export_sources() puts the sources at the source folder's root.
        basic_layout(self, src_folder=".")

    def requirements(self):
        # A header-only library's requirements reach its consumers' headers and links.
        # LibTorch: ConanCenter's recipe is `libtorch` (2.9.1 there now); fabric builds against 1.13 to 2.x.
        # NOTE: ConanCenter builds LibTorch without distributed support (USE_DISTRIBUTED off) and without
        # CUDA, so only <fabric/fabric.hpp> is usable with it; <fabric/distributed.hpp> needs c10d.
        self.requires("libtorch/[>=1.13 <3]")
        # NOTE: ConanCenter's libtorch requires fmt/[^10]; a wider range here would resolve to a newer fmt
        # first and then conflict with it.
        self.requires("fmt/[^10]")
        self.requires("range-v3/0.12.0")
        self.requires("nlohmann_json/3.11.2")

    def package_id(self):
        self.info.clear()

    def validate(self):
        check_min_cppstd(self, 20)

    def build(self):
        pass

    def package(self):
        # Copying the headers, not running fabric's CMake install: Conan's CMakeDeps and PkgConfigDeps write
        # the consumers' fabric-config.cmake and fabric.pc from package_info() below, so the files fabric's
        # install generates would be dropped; and that install needs a configure of the whole project
        # (find_package of LibTorch, fmt and range-v3 through Conan's toolchain) to copy these same headers.
        copy(self, "LICENSE*", src=self.source_folder, dst=os.path.join(self.package_folder, "licenses"))
        copy(self, "*", src=os.path.join(self.source_folder, "include"),
             dst=os.path.join(self.package_folder, "include"))

    def package_info(self):
        self.cpp_info.set_property("cmake_file_name", "fabric")
        self.cpp_info.set_property("cmake_target_name", "fabric::fabric")
        self.cpp_info.set_property("pkg_config_name", "fabric")
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        # NOTE: TensorBoardLogger's flush timer is a std::thread.
        if self.settings.os in ("Linux", "FreeBSD"):
            self.cpp_info.system_libs = ["pthread"]
