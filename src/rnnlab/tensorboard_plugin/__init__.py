"""The "Gradient flow" tab of TensorBoard: the gradflow summaries (`summary`) and the plugin that
serves them (`plugin`), registered through the ``tensorboard_plugins`` entry point.

The plugin is imported when first named (``GradFlowLoader``, ``GradFlowPlugin``): a training run
writes summaries with `summary` alone and does not load TensorBoard's web server.
"""

from rnnlab.tensorboard_plugin.summary import PLUGIN_NAME

__all__ = ["PLUGIN_NAME", "GradFlowLoader", "GradFlowPlugin"]


def __getattr__(name: str):
    if name in ("GradFlowLoader", "GradFlowPlugin"):
        from rnnlab.tensorboard_plugin import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
