"""One engine for both graphs: one copy of the weights on the GPU.

Two engines (one per graph) each keep their own copy of every weight: the 26B model in bf16 would need
2 x 52 GB. Instead both graphs go into one ONNX model: every node, value and symbolic dimension named
`<graph>/<name>`, every weight kept once under its own name and read from the export's weights.bin (the
exporter's small constants of the same name in both graphs, where their values differ, are each graph's
own). TensorRT builds it into one engine with one optimization profile per graph (profile i: GRAPHS[i])
in which the other graph's inputs are empty (batch 0: idle_shapes), so that graph computes nothing, and
no weight memory beyond the first profile's (dgrt.tensorrt.build). The backend makes one execution
context per profile; the two share the engine's weights and one activation buffer (they never run at
the same time).

Pure ONNX here: the model is built and checked without TensorRT (ONNX Runtime runs it in the tests).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from dgrt.contract.manifest import GRAPHS, Manifest
from dgrt.errors import DgrtError

ONE_ENGINE_PLAN = "model.plan"
Shape = tuple[int, ...]


def prefixed(graph: str, name: str) -> str:
    """A graph's tensor (input, output or intermediate) as the one-engine model names it."""
    return f"{graph}/{name}"


def idle_graph(graph: str) -> str:
    """The graph bound empty while the engine runs `graph`."""
    (other,) = (g for g in GRAPHS if g != graph)
    return other


def combine(export_dir: Path, manifest: Manifest) -> onnx.ModelProto:
    """Both graphs of an export as one model whose weights are those of its weights.bin, each once. The
    external data stays in the export: parse the model with a path inside export_dir."""
    models = {g: onnx.load(export_dir / manifest.graphs[g].file, load_external_data=False) for g in GRAPHS}
    first = models[GRAPHS[0]]
    weights: dict[str, onnx.TensorProto] = {}
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    values: list[onnx.ValueInfoProto] = []
    for graph, model in models.items():
        if model.functions or model.opset_import != first.opset_import:
            raise DgrtError(f"{graph}.onnx has local functions or other opsets than {GRAPHS[0]}.onnx; re-export it.")
        own = set()  # this graph's initializers that keep their names: the weights, shared by both graphs
        for tensor in model.graph.initializer:
            if weights.setdefault(tensor.name, tensor) == tensor:
                own.add(tensor.name)
            else:  # a constant named as one of the other graph's (the exporter's val_<n>) with another value
                renamed_tensor = onnx.TensorProto()
                renamed_tensor.CopyFrom(tensor)
                renamed_tensor.name = prefixed(graph, tensor.name)
                weights[renamed_tensor.name] = renamed_tensor

        def rename(name: str, graph: str = graph, own: set[str] = own) -> str:
            return name if not name or name in own else prefixed(graph, name)

        for node in model.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise DgrtError(f"{graph}.onnx has a subgraph ({node.op_type} {node.name}); one engine cannot hold it.")
            renamed = onnx.NodeProto()
            renamed.CopyFrom(node)
            renamed.name = prefixed(graph, node.name)
            renamed.input[:] = [rename(n) for n in node.input]
            renamed.output[:] = [rename(n) for n in node.output]
            nodes.append(renamed)
        for source, target in (
            (model.graph.input, inputs),
            (model.graph.output, outputs),
            (model.graph.value_info, values),
        ):
            for value in source:
                renamed_value = onnx.ValueInfoProto()
                renamed_value.CopyFrom(value)
                renamed_value.name = rename(value.name)
                # Runtimes take equal symbolic dimensions for equal lengths: the graphs' must stay apart.
                for dim in renamed_value.type.tensor_type.shape.dim:
                    if dim.dim_param:
                        dim.dim_param = prefixed(graph, dim.dim_param)
                target.append(renamed_value)
    graph_proto = onnx.helper.make_graph(
        nodes, "dgrt_prefill_and_denoise", inputs, outputs, initializer=list(weights.values()), value_info=values
    )
    return onnx.helper.make_model(
        graph_proto, opset_imports=list(first.opset_import), producer_name="dgrt", ir_version=first.ir_version
    )


def parse_path(export_dir: Path, manifest: Manifest) -> str:
    """The path TensorRT's parser (and refitter) is given with the combined model's bytes: a file of the
    export, so that weights.bin (external data) is found next to it."""
    return str(export_dir / manifest.graphs[GRAPHS[0]].file)


def one_engine_profiles(
    per_graph: dict[str, dict[str, tuple[Shape, Shape, Shape]]], manifest: Manifest
) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """The engine's optimization profiles, one per graph (in GRAPHS order): that graph's inputs over its own
    ranges (`per_graph`, from dgrt.tensorrt.options.profiles), the other graph's inputs empty."""
    out = []
    for graph in GRAPHS:
        profile = {prefixed(graph, name): shapes for name, shapes in per_graph[graph].items()}
        idle = idle_graph(graph)
        profile |= {prefixed(idle, name): (shape,) * 3 for name, shape in idle_shapes(manifest, idle).items()}
        out.append(profile)
    return out


def idle_shapes(manifest: Manifest, graph: str) -> dict[str, Shape]:
    """A graph's inputs while the engine runs the other graph: batch 0, so that every tensor of the graph is
    empty (each input has the batch dimension), and no expert slots. The other symbolic dimensions keep a
    length of 1 or 0 that no reshape can mistake: ONNX's Reshape reads a 0 in a target shape as "keep
    this dimension", so a new-token length of 0 would be read as another dimension's length."""
    idle = {"batch": 0, "seq": 1, "past_full": 0, "past_sliding": 0, "expert_capacity": 0}
    out = {}
    for spec in manifest.graphs[graph].spec.inputs:
        if "batch" not in spec.shape and "expert_capacity" not in spec.shape:
            raise DgrtError(f"the {graph} graph's input {spec.name} has no batch dimension; it cannot be idle.")
        out[spec.name] = tuple(d if isinstance(d, int) else idle[d] for d in spec.shape)
    return out
