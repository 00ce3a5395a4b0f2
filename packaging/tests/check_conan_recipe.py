#!/usr/bin/env python3
"""Exercises the Conan recipe (packaging/conan/conanfile.py) and its test_package without Conan.

Conan 2 is not packaged in Debian 12 and PyPI is out of reach here, so this script stands in for the
few names the recipes import from the `conan` module (ConanFile, copy, basic_layout, check_min_cppstd,
...) with small stubs, then calls the recipe's methods in the order `conan create` does and checks what
they do: the requirements they declare, the files export_sources() and package() copy, the properties
package_info() sets, that package_id() clears the ID and that validate() asks for C++20.

It checks the recipe's own logic only: not Conan's graph resolution (that ConanCenter's libtorch, fmt and
range-v3 resolve together), nor the CMakeDeps files Conan generates from package_info().

usage: check_conan_recipe.py CONAN_DIR SOURCE_DIR WORK_DIR EXPECTED_VERSION
"""
import fnmatch
import importlib.util
import os
import py_compile
import shutil
import sys
import types
from pathlib import Path


# ---- stand-ins for the conan module's API ------------------------------------------------------------
class ConanInvalidConfiguration(Exception):
    pass


class Settings:
    def __init__(self, values):
        self._values = dict(values)

    def get_safe(self, name, default=None):
        return self._values.get(name, default)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._values.get(name)


class CppInfo:
    def __init__(self):
        self.properties = {}
        self.includedirs = ["include"]
        self.libdirs = ["lib"]
        self.bindirs = ["bin"]
        self.libs = []
        self.system_libs = []
        self.requires = []

    def set_property(self, name, value):
        self.properties[name] = value

    def get_property(self, name):
        return self.properties.get(name)


class Info:
    cleared = False

    def clear(self):
        self.cleared = True


class ConanFile:
    def __init__(self, settings=None):
        self.settings = Settings(settings or {})
        self.cpp_info = CppInfo()
        self.info = Info()
        self.cpp = types.SimpleNamespace(build=types.SimpleNamespace(bindir="build/Release"))
        self.declared_requires = []
        self.commands = []
        self.layout_folders = None

    def requires(self, ref, **traits):
        self.declared_requires.append((ref, traits))

    def run(self, command, env=None, **kwargs):
        self.commands.append((command, env))


def copy(conanfile, pattern, src, dst, keep_path=True, excludes=None, ignore_case=True):
    """Conan's copy(): fnmatch of `pattern` against each file's path relative to src ('*' crosses '/'),
    case-insensitive by default; folders that are symbolic links are not entered."""
    copied = []
    src = os.path.normpath(src)
    excludes = [excludes] if isinstance(excludes, str) else list(excludes or [])
    fold = (lambda text: text.lower()) if ignore_case else (lambda text: text)
    for root, subfolders, files in os.walk(src):
        subfolders[:] = [d for d in subfolders if not os.path.islink(os.path.join(root, d))]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), src).replace(os.sep, "/")
            if not fnmatch.fnmatchcase(fold(rel), fold(pattern)):
                continue
            if any(fnmatch.fnmatchcase(fold(rel), fold(e)) for e in excludes):
                continue
            target = os.path.join(dst, rel if keep_path else name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(root, name), target)
            copied.append(target)
    return copied


def check_min_cppstd(conanfile, cppstd):
    conanfile.min_cppstd_checked = int(cppstd)
    value = conanfile.settings.get_safe("compiler.cppstd")
    if value is not None and int(str(value).replace("gnu", "")) < int(cppstd):
        raise ConanInvalidConfiguration(f"requires at least C++{cppstd}, compiler.cppstd={value}")


def basic_layout(conanfile, src_folder=".", build_folder="build"):
    conanfile.layout_folders = {"source": src_folder, "build": build_folder}


def cmake_layout(conanfile, **kwargs):
    conanfile.layout_folders = {"cmake_layout": kwargs}


def can_run(conanfile):
    return True


class CMake:
    def __init__(self, conanfile):
        self._conanfile = conanfile

    def configure(self, **kwargs):
        self._conanfile.commands.append(("cmake configure", None))

    def build(self, **kwargs):
        self._conanfile.commands.append(("cmake build", None))


def install_stub():
    modules = {
        "conan": {"ConanFile": ConanFile},
        "conan.errors": {"ConanInvalidConfiguration": ConanInvalidConfiguration},
        "conan.tools": {},
        "conan.tools.build": {"check_min_cppstd": check_min_cppstd, "can_run": can_run},
        "conan.tools.files": {"copy": copy},
        "conan.tools.layout": {"basic_layout": basic_layout},
        "conan.tools.cmake": {"CMake": CMake, "cmake_layout": cmake_layout},
    }
    for name, names in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(names)
        sys.modules[name] = module


def load_recipe(path):
    spec = importlib.util.spec_from_file_location(f"recipe_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, ConanFile) and c is not ConanFile]
    if len(classes) != 1:
        raise SystemExit(f"{path}: expected one ConanFile class, found {len(classes)}")
    return classes[0]


def files_under(folder):
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ---- the checks --------------------------------------------------------------------------------------
def main(conan_dir, source_dir, work_dir, expected_version):
    conan_dir, source_dir, work_dir = Path(conan_dir), Path(source_dir), Path(work_dir)
    recipe_path, test_path = conan_dir / "conanfile.py", conan_dir / "test_package" / "conanfile.py"
    for path in (recipe_path, test_path):
        py_compile.compile(str(path), cfile=str(work_dir / (path.parent.name + ".pyc")), doraise=True)

    install_stub()
    problems = []
    Recipe = load_recipe(recipe_path)

    expect = {"name": "fabric", "version": expected_version, "package_type": "header-library", "no_copy_source": True}
    for attribute, value in expect.items():
        if getattr(Recipe, attribute, None) != value:
            problems.append(f"{attribute} is {getattr(Recipe, attribute, None)!r}, expected {value!r}")
    for setting in ("os", "arch", "compiler", "build_type"):
        if setting not in getattr(Recipe, "settings", ()):
            problems.append(f"settings lack {setting!r}")

    shutil.rmtree(work_dir / "export", ignore_errors=True)
    shutil.rmtree(work_dir / "package", ignore_errors=True)
    recipe = Recipe({"os": "Linux", "arch": "x86_64", "compiler": "gcc", "compiler.cppstd": "gnu20", "build_type": "Release"})
    recipe.recipe_folder = str(conan_dir)
    recipe.export_sources_folder = str(work_dir / "export")

    # export_sources(): the headers (and the license, when the checkout has one).
    recipe.export_sources()
    exported = files_under(work_dir / "export")
    source_headers = files_under(source_dir / "include")
    if [f for f in exported if f.startswith("include/")] != ["include/" + h for h in source_headers]:
        problems.append("export_sources() did not export exactly include/")
    licenses = [p.name for p in source_dir.glob("LICENSE*")]
    if sorted(f for f in exported if not f.startswith("include/")) != sorted(licenses):
        problems.append(f"export_sources() exported more than include/ and the license: {exported[:5]}...")

    # layout(): the source folder is where export_sources() put the files.
    recipe.layout()
    src = (recipe.layout_folders or {}).get("source")
    if src not in (".", ""):
        problems.append(f"layout() puts the sources in {src!r}, but export_sources() copies them to the root")
    recipe.source_folder = os.path.join(recipe.export_sources_folder, src or ".")

    # requirements(): libtorch, fmt, range-v3 and nlohmann_json, by their ConanCenter names.
    recipe.requirements()
    refs = [ref for ref, _ in recipe.declared_requires]
    names = sorted(ref.split("/", 1)[0] for ref in refs)
    if names != ["fmt", "libtorch", "nlohmann_json", "range-v3"]:
        problems.append(f"requirements() declares {refs}, expected fmt, range-v3, nlohmann_json and libtorch")
    for ref in refs:
        if "/" not in ref or not ref.split("/", 1)[1]:
            problems.append(f"requirement {ref!r} has no version")

    # validate(): C++20, and nothing older.
    recipe.validate()
    if getattr(recipe, "min_cppstd_checked", None) != 20:
        problems.append("validate() does not check_min_cppstd(self, 20)")
    for cppstd, ok in (("17", False), ("gnu17", False), ("20", True), ("23", True)):
        older = Recipe({"os": "Linux", "compiler.cppstd": cppstd})
        try:
            older.validate()
            accepted = True
        except ConanInvalidConfiguration:
            accepted = False
        if accepted != ok:
            problems.append(f"validate() {'accepts' if accepted else 'rejects'} compiler.cppstd={cppstd}")

    # package_id(): one package for every configuration.
    recipe.package_id()
    if not recipe.info.cleared:
        problems.append("package_id() does not clear the package ID")

    # build() and package(): the headers under include/, the license under licenses/, nothing else.
    recipe.build()
    recipe.package_folder = str(work_dir / "package")
    recipe.package()
    packaged = files_under(work_dir / "package")
    if [f for f in packaged if f.startswith("include/")] != ["include/" + h for h in source_headers]:
        problems.append("package() did not package exactly the headers of include/")
    others = sorted(f for f in packaged if not f.startswith("include/"))
    if others != sorted("licenses/" + name for name in licenses):
        problems.append(f"package() put more than the headers and the license: {others}")

    # package_info(): what Conan's generators make of the package.
    recipe.package_info()
    info = recipe.cpp_info
    for prop, value in (("cmake_file_name", "fabric"), ("cmake_target_name", "fabric::fabric"), ("pkg_config_name", "fabric")):
        if info.get_property(prop) != value:
            problems.append(f"package_info(): {prop} is {info.get_property(prop)!r}, expected {value!r}")
    if info.bindirs != [] or info.libdirs != []:
        problems.append(f"package_info(): bindirs {info.bindirs} and libdirs {info.libdirs} should be empty")
    if info.libs:
        problems.append(f"package_info(): a header-only package has no libs, found {info.libs}")

    # test_package: requires the tested reference, builds with CMakeDeps/CMakeToolchain, runs the program.
    Test = load_recipe(test_path)
    test = Test({"os": "Linux"})
    test.tested_reference_str = f"fabric/{expected_version}"
    test.requirements()
    if [ref for ref, _ in test.declared_requires] != [test.tested_reference_str]:
        problems.append(f"test_package requires {test.declared_requires}, expected the tested reference")
    generators = set(getattr(Test, "generators", ()))
    if not {"CMakeDeps", "CMakeToolchain"} <= generators:
        problems.append(f"test_package's generators {sorted(generators)} lack CMakeDeps or CMakeToolchain")
    test.layout()
    test.build()
    test.test()
    ran = [(c, env) for c, env in test.commands if c.endswith("test_package")]
    if [c for c, _ in test.commands[:2]] != ["cmake configure", "cmake build"] or not ran or ran[0][1] != "conanrun":
        problems.append(f"test_package does not configure, build and run test_package (with env conanrun): {test.commands}")
    for required in ("CMakeLists.txt", "test_package.cpp"):
        if not (test_path.parent / required).exists():
            problems.append(f"test_package/{required} missing")

    if problems:
        print("Conan recipe problems:\n  " + "\n  ".join(problems))
        return 1
    print(f"conan recipe: {Recipe.name}/{Recipe.version} ({Recipe.package_type}) requires {', '.join(refs)}; "
          f"packages {len(source_headers)} headers; fabric::fabric, fabric.pc; test_package builds and runs "
          "(checked with stand-ins for Conan's API, not with Conan)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
