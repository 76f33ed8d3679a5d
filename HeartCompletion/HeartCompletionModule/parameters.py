"""What the panel stores: the typed parameter node (saved with the scene) and the settings keys
(remembered across sessions). Needs the Slicer application (``slicer.parameterNodeWrapper``).

Every widget of the .ui with a ``SlicerParameterName`` names a field here (a test checks it);
``connectGui`` keeps them in sync, so there is no hand-written widget syncing.

Usage (inside Slicer)::

    parameters = getParameterNode()
    parameters.segmentation, parameters.device      # (vtkMRMLSegmentationNode, "auto")
"""

import pathlib
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper

#: The module's name: the parameter node's singleton tag and ``ModuleName`` attribute.
MODULE_NAME = "HeartCompletion"
#: The checkpoint file chosen last.
CHECKPOINT_SETTING = "HeartCompletion/CheckpointPath"
#: The registered model chosen last ("" = the checkpoint file): remembered, never chosen by default.
MODEL_SETTING = "HeartCompletion/RegisteredModel"
#: "Do not ask again" for the question before a CPU run.
DONT_ASK_BEFORE_CPU_SETTING = "HeartCompletion/DontAskBeforeCpu"


@parameterNodeWrapper
class HeartCompletionParameterNode:
    segmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    checkpointPath: pathlib.Path
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    replaceExisting: bool = False
    showSurfaces: bool = True
    exportFolder: pathlib.Path
    meshFormat: Annotated[str, Choice(["STL", "OBJ"])] = "STL"


def getParameterNode() -> HeartCompletionParameterNode:
    """The scene's one parameter node of the module, created on first use; the same node (tag and
    attribute) as ``ScriptedLoadableModuleLogic.getParameterNode`` gives, so saved scenes reopen."""
    scene = slicer.mrmlScene
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # owned by the Python variable now
        node.SetSingletonTag(MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node.SetAttribute("ModuleName", MODULE_NAME)
        node = scene.AddNode(node)
    elif node.GetAttribute("ModuleName") != MODULE_NAME:  # removed by a scene close
        node.SetAttribute("ModuleName", MODULE_NAME)
    return HeartCompletionParameterNode(node)


def pathText(path) -> str:
    """A parameter-node path as text; "" when unset (an unset ``pathlib.Path`` reads as ".")."""
    text = str(path) if path is not None else ""
    return "" if text in ("", ".") else text
