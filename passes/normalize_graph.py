"""NormalizeGraph: give every node a unique name and turn computed constants into initializers.

Pattern -> rewrite:
    node with no name, or a name already taken  ->  "<op_type>_<index>" (deterministic)
    Constant(value=T) -> t                       ->  initializer t = T
    a subgraph of constants only, such as       ->  initializer with its value (ONNX Runtime folds
    ConstantOfShape weights or Transpose(W)          the same at load)
Later passes address nodes by name and recognise weights as initializers, whatever way the
exporter wrote them.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from qcompile.graph import replace_input
from qcompile.pipeline import CompileContext, PassResult


class NormalizeGraph:
    name = "normalize-graph"

    def run(self, context: CompileContext) -> PassResult:
        graph = context.graph
        renamed = _name_nodes(graph)
        folded = _constants_to_initializers(graph)
        graph.cleanup()
        computed = _fold_constant_subgraphs(graph)
        return PassResult(renamed + folded + computed,
                          f"named {renamed} nodes, folded {folded} Constant nodes and {computed} constant subgraph nodes")


def _name_nodes(graph: gs.Graph) -> int:
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{index}"
            renamed += 1
        seen.add(node.name)
    return renamed


def _constants_to_initializers(graph: gs.Graph) -> int:
    folded = 0
    for node in graph.nodes:
        value = node.attrs.get("value") if node.op == "Constant" else None
        output = node.outputs[0] if node.outputs else None
        if not isinstance(value, gs.Constant) or output is None or output in graph.outputs:
            continue
        constant = gs.Constant(output.name, values=value.values)
        replace_input(output, constant)
        node.outputs.clear()
        folded += 1
    return folded


def _fold_constant_subgraphs(graph: gs.Graph) -> int:
    before = len(graph.nodes)
    graph.fold_constants(fold_shapes=False, error_ok=True, flatten_subgraphs=False).cleanup()
    return before - len(graph.nodes)
