"""Cut a Keras embedder at a block boundary: frozen bottom, trainable top.

Both halves share the embedder's layers, so training the top tunes the
embedder itself. Blocks are numbered for the MobileNetV2 port (torchvision's
`features[i]`, 1..18) and named by their first layer for `keras:` backbones
(e.g. `block_13_expand` in keras.applications.MobileNetV2). A cut must be a
single tensor every path crosses; residual connections make most layers
inside a block invalid cut points.
"""

from __future__ import annotations

from embedstore.backbones import BackboneError
from embedstore.backbones.mobilenet_v2 import block_entry_layer, is_port, port_blocks


def _find(model, layer_name: str):
    """(graph holding the layer, layer): the model itself or one nested sub-model."""
    for layer in model.layers:
        if layer.name == layer_name:
            return model, layer
    for layer in model.layers:
        if hasattr(layer, "layers"):
            for inner in layer.layers:
                if inner.name == layer_name:
                    return layer, inner
    return None, None


def entry_layer_name(model, block: str | int) -> str:
    """The layer whose input is the cut for BLOCK (a port number or a layer name)."""
    if is_port(model) and str(block).lstrip("-").isdigit():  # -1 is out of range, not a name
        if int(block) not in port_blocks():
            raise BackboneError(f"block {block} is out of range; valid blocks: "
                                f"{port_blocks()[0]}..{port_blocks()[-1]} (0 = from pixels)")
        return block_entry_layer(int(block))
    return str(block)


def split_at(model, block: str | int):
    """(bottom, top): bottom maps pixels to the input of BLOCK, top maps it to the embedding."""
    import keras

    name = entry_layer_name(model, block)
    graph, layer = _find(model, name)
    if layer is None:
        raise BackboneError(f"the backbone has no layer {name!r}; give a block as the name "
                            f"of the first layer of a block, e.g. {_examples(model)}")
    try:
        cut = layer.input
        if isinstance(cut, (list, tuple)):
            raise ValueError("several inputs")
        inner_bottom = keras.Model(graph.input, cut)
        top = keras.Model(cut, graph.output)
        if graph is model:
            return inner_bottom, top
        outer_in = graph._inbound_nodes[0].input_tensors[0]  # where the sub-model is called
        if model.output is not graph._inbound_nodes[0].output_tensors[0]:
            raise ValueError("the sub-model is not the last stage")
        return keras.Model(model.input, inner_bottom(outer_in)), top
    except Exception as exc:
        raise BackboneError(f"cannot cut the backbone at {name!r} ({type(exc).__name__}); "
                            f"a block must start where every path crosses one tensor, "
                            f"e.g. {_examples(model)}") from None


def _examples(model) -> str:
    if is_port(model):
        return "1..18"
    graphs = [model] + [layer for layer in model.layers if hasattr(layer, "layers")]
    names = [layer.name for g in graphs
             for layer in g.layers if layer.name.endswith(("_expand", "_1_conv", "_0_conv"))]
    return ", ".join(names[-8:]) or "a layer name from model.summary()"
