"""The "Gradient flow" tab of TensorBoard: the gradflow summaries (`summary`) and the plugin that
serves them (`plugin`), registered through the ``tensorboard_plugins`` entry point."""

from rnnlab.tensorboard_plugin.plugin import GradFlowLoader, GradFlowPlugin
from rnnlab.tensorboard_plugin.summary import PLUGIN_NAME

__all__ = ["PLUGIN_NAME", "GradFlowLoader", "GradFlowPlugin"]
