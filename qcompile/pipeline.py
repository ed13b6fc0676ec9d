"""The Pass protocol, the state passes share, and the pipeline that runs them in order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import onnx
import onnx_graphsurgeon as gs

from .config import QuantConfig
from .errors import InternalError, QCompileError
from .graph import to_graph, to_model
from .plan import QuantPlan


@dataclass
class CompileContext:
    """Everything passes read and write; nothing lives in globals."""

    graph: gs.Graph
    model: onnx.ModelProto  # the checked export of `graph` as the last pass left it
    source: onnx.ModelProto  # the float model as given, for metadata
    config: QuantConfig
    plan: QuantPlan = field(default_factory=QuantPlan)
    notes: list[dict] = field(default_factory=list)  # what passes found, or why a pattern did not match
    lut: dict = field(default_factory=dict)  # weight tensor -> lut_search.Encoded: its quantizer and codes

    def note(self, pass_name: str, node: str, message: str) -> None:
        self.notes.append({"pass": pass_name, "node": node, "note": message})

    @classmethod
    def from_model(cls, model: onnx.ModelProto, config: QuantConfig) -> "CompileContext":
        return cls(graph=to_graph(model), model=model, source=model, config=config)


@dataclass(frozen=True)
class PassResult:
    changed: int  # how many places the pass rewrote (0: graph untouched)
    summary: str


class GraphPass(Protocol):
    name: str

    def run(self, context: CompileContext) -> PassResult: ...


@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: int
    summary: str


class Pipeline:
    def __init__(self, passes: list[GraphPass]):
        self.passes = passes

    def run(self, context: CompileContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        for graph_pass in self.passes:
            try:
                result = graph_pass.run(context)
                if result.changed:  # check the rewrite, and refresh shapes for the next pass
                    context.model = to_model(context.graph, like=context.source)
                    context.graph = to_graph(context.model)
            except QCompileError:
                raise
            except Exception as error:
                node = _failing_node(error)
                ran = ", ".join(r.name for r in records) or "none"
                where = f"pass {graph_pass.name}{f' at node {node}' if node else ''} (passes before it: {ran})"
                raise InternalError(where, error) from error
            records.append(PassRecord(graph_pass.name, result.changed, result.summary))
        return records


def _failing_node(error: BaseException) -> str | None:
    """The name of the innermost graph node a failing pass was working on, read from the
    traceback's frames, so no pass has to track it."""
    traceback, found = error.__traceback__, None
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if isinstance(value, gs.Node):
                found = value.name
        traceback = traceback.tb_next
    return found
