"""Does the carried wheel set, next to the GPU image's packages, give textcl everything it needs?

    python bench/gpu_requirements.py WHEELS_DIR REPORT [--target SITE]

Resolves, for the image's Python (3.12, Linux x86-64), every requirement of the carried wheels and every core
dependency of textcl (read from the installed textcl's metadata in SITE, else from pyproject.toml) against the
carried wheels and bench/gpu_image_packages.txt. A requirement that neither provides is an error (exit 1): the
GPU run would fail on an import. A version pin that an image package does not meet is listed, not an error:
textcl's lower bounds are the versions its CI ran, above the image's (torch 2.11, transformers 5.17), and it
is installed with --no-deps; its GPU run is what checks those versions. Writes the "install" section of the
report. Standard library and `packaging` only.
"""

from __future__ import annotations

import argparse
import email.parser
import re
import sys
import zipfile
from pathlib import Path

from gpu_report import record
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE_LIST = Path(__file__).resolve().parent / "gpu_image_packages.txt"
IMAGE_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                     "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                     "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """Name -> version (None where no version was seen) of the image's list."""
    packages = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return email.parser.Parser().parsestr(archive.read(name).decode())


def textcl_requirements(target: Path | None) -> list[str]:
    """textcl's core Requires-Dist, from the installed metadata in `target`, else pyproject.toml."""
    if target is not None:
        for metadata in target.glob("textcl-*.dist-info/METADATA"):
            return wheel_requirements(email.parser.Parser().parsestr(metadata.read_text()))
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    return pyproject["project"]["dependencies"]


def wheel_requirements(metadata: email.message.Message) -> list[str]:
    """Requires-Dist lines that apply on the image (no extras, markers true for Python 3.12 on Linux)."""
    requirements = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(IMAGE_ENVIRONMENT):
            requirements.append(line)
    return requirements


def resolve(requirement: str, carried: dict[str, str], image: dict[str, str | None]) -> tuple[str, str | None]:
    """("ok" | "pin" | "missing", detail) for one requirement."""
    parsed = Requirement(requirement)
    name = canonicalize_name(parsed.name)
    for source, packages in (("carried", carried), ("image", image)):
        if name in packages:
            version = packages[name]
            if version is None or parsed.specifier.contains(version, prereleases=True):
                return "ok", None
            return "pin", f"{requirement}: the {source} has {version}"
    return "missing", f"{requirement}: neither carried nor in the image"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("wheels", type=Path)
    parser.add_argument("report", type=Path)
    parser.add_argument("--target", type=Path, default=None, help="the folder textcl was installed into")
    args = parser.parse_args()
    files = sorted(args.wheels.glob("*.whl"))
    metadata = {file.name: wheel_metadata(file) for file in files}
    carried = {canonicalize_name(m["Name"]): m["Version"] for m in metadata.values()}
    errors = [f"two versions of {name} in {args.wheels}" for name in carried
              if sum(canonicalize_name(m["Name"]) == name for m in metadata.values()) > 1]
    image = image_packages()
    errors += [f"{name} is already in the image: carry it only for another version" for name in carried
               if name in image and image[name] in (None, carried[name])]
    pins = []
    needs = [(m["Name"], line) for m in metadata.values() for line in wheel_requirements(m)]
    needs += [("textcl", line) for line in textcl_requirements(args.target)]
    for owner, requirement in needs:
        outcome, detail = resolve(requirement, carried, image)
        if outcome == "missing":
            errors.append(f"{owner} needs {detail}")
        elif outcome == "pin":
            pins.append(f"{owner} needs {detail}")
    if args.target is not None:
        errors += [f"{module} was not installed into {args.target}" for module in
                   ("datasets", "dill", "multiprocess", "faiss", "bm25s", "textcl") if not (args.target / module).is_dir()]
    record(args.report, "install", {
        "wheels": {file.name: file.stat().st_size for file in files},
        "wheels_mib": round(sum(file.stat().st_size for file in files) / 2**20, 1),
        "unresolved": errors, "pins_the_image_does_not_meet": pins, "image_list": IMAGE_LIST.name})
    for line in pins:
        print(f"note: {line} (installed with --no-deps)")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
