"""What the completion needs in Slicer's Python, checked by version and installed on first use.

Presence is not enough: a package older than the extension's floor (say nibabel 3 left by another
extension) fails in the background process with an obscure error. So every requirement carries the
minimum version the extension declares (the same floors as ``pyproject.toml``'s dependencies; a
test keeps them equal), and what is missing *or older* is installed: PyTorch through the PyTorch
extension (the right CUDA build; ``pip install torch>=...`` when that extension is absent), the
file-format packages with one ``pip install``, then the optional speed-ups (``edt``, ``cc3d``:
scipy does their work when pip cannot install them). numpy and scipy come with Slicer and are only
checked (a pip-installed numpy, vtk or SimpleITK would break Slicer); too old means a too old Slicer.

Needs ``slicer`` (``slicer.util.pip_install``, the confirmation dialog) but no Qt of its own; the
dialog and the installers can be passed in, so tests record instead of install.

Usage::

    install = InstallLogic()
    install.logged.connect(print)
    [(r.distribution, version) for r, version in install.outdated()]   # [("pynrrd", None), ...]
    if install.ensureRequirements():   # asks before installing PyTorch; False when declined
        ...
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass

import slicer

from .i18n import _
from .signals import Signal


@dataclass(frozen=True)
class Requirement:
    """A Python package the completion needs: its import name, its distribution (pip) name and
    the minimum version the extension declares."""

    import_name: str
    distribution: str
    minimum: str

    @property
    def specifier(self) -> str:
        """What pip is asked for: ``"nibabel>=4.0"``."""
        return f"{self.distribution}>={self.minimum}"


#: PyTorch: installed through the PyTorch extension (a declared dependency of this extension).
TORCH = Requirement("torch", "torch", "2.1")
#: Installed with pip when missing or older than the minimum.
PIP_REQUIREMENTS = (
    Requirement("safetensors", "safetensors", "0.4"),
    Requirement("nibabel", "nibabel", "4.0"),
    Requirement("nrrd", "pynrrd", "1.0"),
    Requirement("skimage", "scikit-image", "0.19"),
)
#: Speed only (the ``fast`` extra): installed with pip when missing or older, after the ones above;
#: where pip cannot install them (no wheel for this platform) the completion does the same work with
#: scipy, the same results more slowly (a CT completion's distance transforms and connected pieces).
OPTIONAL_REQUIREMENTS = (
    Requirement("edt", "edt", "2.3"),
    Requirement("cc3d", "connected-components-3d", "3.10"),
)
#: Bundled with Slicer: checked, never installed.
BUNDLED = (Requirement("numpy", "numpy", "1.22"), Requirement("scipy", "scipy", "1.8"))
#: Never pip-installed by this extension, whatever a requirement pulls in.
NEVER_INSTALLED = frozenset({"numpy", "vtk", "simpleitk", "scipy"})


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.13.0+cpu"`` -> ``(2, 13, 0)``, ``"1.10"`` ->
    ``(1, 10)`` (compared as numbers, so 1.10 > 1.9). Pre-release tags are ignored."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def isAtLeast(version: str, minimum: str) -> bool:
    """Whether ``version`` is ``minimum`` or newer (missing trailing parts count as 0)."""
    have, need = release(version), release(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


class InstallLogic:
    """Checks and installs the requirements; reports what it does through :attr:`logged` (text).

    ``confirm(text) -> bool`` asks the user (default: Slicer's OK/Cancel dialog),
    ``pipInstall(requirements)`` installs (default: ``slicer.util.pip_install``).
    """

    def __init__(self, confirm=None, pipInstall=None) -> None:
        self._confirm = confirm or (lambda text: slicer.util.confirmOkCancelDisplay(text))
        self._pipInstall = pipInstall or (lambda requirements: slicer.util.pip_install(requirements))
        self.logged = Signal()
        #: True once pip failed to install the speed-ups: not tried again in this Slicer session
        #: (each try costs a pip run; scipy does the same work)
        self.speedupsFailed = False
        #: True once a PyTorch that this process had already imported was upgraded: the panel's
        #: version line is stale until Slicer restarts (the background process uses the new one).
        self.needsRestart = False

    def _log(self, text: str) -> None:
        logging.info(text)
        self.logged.emit(text)

    def installedVersion(self, requirement: Requirement) -> str | None:
        """The installed version; ``None`` when not installed; ``""`` when importable but without
        package metadata (a copy placed by hand: accepted, its version cannot be checked)."""
        try:
            return importlib.metadata.version(requirement.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "" if importlib.util.find_spec(requirement.import_name) is not None else None

    def isSatisfied(self, requirement: Requirement) -> bool:
        version = self.installedVersion(requirement)
        return version == "" or (version is not None and isAtLeast(version, requirement.minimum))

    def outdated(self, requirements=None) -> list[tuple[Requirement, str | None]]:
        """``(requirement, installed version or None)`` of every requirement that is missing or
        older than its minimum (default: PyTorch, the pip packages and Slicer's bundled ones)."""
        requirements = (TORCH, *PIP_REQUIREMENTS, *BUNDLED) if requirements is None else requirements
        return [(r, self.installedVersion(r)) for r in requirements if not self.isSatisfied(r)]

    def ensureRequirements(self) -> bool:
        """PyTorch (after asking) and then the pip packages; False when the user declined."""
        if not self.isSatisfied(TORCH):
            version = self.installedVersion(TORCH)
            if version is None:
                question = _("Complete heart needs PyTorch, which is not installed. Install it now (a few minutes)?")
            else:
                question = _("Complete heart needs PyTorch {0} or newer; version {1} is installed. Update it now "
                             "(a few minutes)?").format(TORCH.minimum, version)
            if not self._confirm(question):
                return False
            self._installTorch()
            self.needsRestart = version is not None and "torch" in sys.modules
        self.ensurePackages()
        return True

    def _installTorch(self) -> None:
        self._log(_("Installing {0}").format(TORCH.specifier))
        try:
            import PyTorchUtils
        except ImportError:  # the PyTorch extension is absent: plain pip (CPU or the default CUDA build)
            self._pipInstall(TORCH.specifier)
            return
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=f">={TORCH.minimum}") is None:
            raise RuntimeError(_("PyTorch installation failed; see the Python console."))

    def ensurePackages(self) -> None:
        """pip-install the file-format packages that are missing or too old (one pip call), then the
        speed-ups (:meth:`ensureSpeedups`); refuse, naming the package, when a package bundled with
        Slicer is too old."""
        tooOld = self.outdated(BUNDLED)
        if tooOld:
            raise RuntimeError(_("This Slicer is too old for Complete heart: {0}.").format(
                ", ".join(_("{0} {1} (needs {2} or newer)").format(r.distribution, v or _("missing"), r.minimum)
                          for r, v in tooOld)))
        needed = [r.specifier for r, _version in self.outdated(PIP_REQUIREMENTS)]
        if needed:
            self._log(_("Installing {0}").format(", ".join(needed)))
            self._pipInstall(needed)
        self.ensureSpeedups()

    def ensureSpeedups(self) -> bool:
        """pip-install the optional speed-ups that are missing or too old (one pip call); a failure is
        logged, not raised (scipy does the same work), and not tried again in this session. True
        when all of them are there."""
        needed = [r.specifier for r, _version in self.outdated(OPTIONAL_REQUIREMENTS)]
        if not needed:
            return True
        if self.speedupsFailed:
            return False
        self._log(_("Installing {0} (faster distance transforms and connected pieces)").format(", ".join(needed)))
        try:
            self._pipInstall(needed)
        except Exception as error:  # noqa: BLE001 - whatever pip raised, the completion still works
            self._log(_("Could not install {0} ({1}); the completion uses scipy instead: the same results, "
                        "more slowly.").format(", ".join(needed), error))
            self.speedupsFailed = True
            return False
        return True
