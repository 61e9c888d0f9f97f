"""Train-mode decompositions kept out of onnxruntime's optimizing build and spliced into the graph it writes.

The statistics-first session (run.py) builds twice: once at ORT_ENABLE_ALL to get the optimized graph, then
that graph re-ordered with optimizations off. The first build's cost grows with the node count, and a
decomposition adds six nodes per train-mode BN that no rewrite touches but the first pool of x (which
onnxruntime turns NCHWc). So the optimizing build sees each such BN as the model wrote it, beside that pool,
and the rest of its decomposition is put in the node's place in the optimized graph: the same kernels run
as when the whole decomposed graph is optimized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bncheck.backends.onnx.graph import copied, copy_messages


@dataclass
class Decomposition:
    """One train-mode BN's decomposition as the augmented graph holds it (instrument.Augmenter._decompose)."""

    node: Any  # the model's node for the optimizing build: its output y, and the running statistics where read
    later: list[str]  # names of the decomposition's nodes spliced in its place (all but the first pool)
    reads: list[str]  # the node's five inputs (x, scale, bias, mean, var) as the augmented graph names them


class Splice:
    """Edits an augmented model into the graph for the optimizing build, and splices the decompositions back."""

    def __init__(self, model: Any, decompositions: list[Decomposition]) -> None:
        """Rewrites ``model`` in place: each decomposition's later nodes out, its BN node in their place."""
        graph = model.graph
        self.decompositions = decompositions
        later = {name for d in decompositions for name in d.later}
        writer = {d.node.output[0]: d.node for d in decompositions}
        self.nodes: dict[str, Any] = {}  # name -> each later node, taken out of the model
        # edited in place, from the end: the model's nodes (with a model's weights in Constant nodes) stay
        # where they are instead of being copied
        hits = [i for i, node in enumerate(graph.node) if node.name in later]
        for i in reversed(hits):
            node = graph.node.pop(i)  # the removed node itself, no copy
            self.nodes[node.name] = node
            if node.output[0] in writer:
                graph.node.insert(i, writer[node.output[0]])  # the BN in the place of the node writing its y
        # what the later nodes write besides the BN's own outputs (its y may be a model output)
        own = {out for d in decompositions for out in d.node.output}
        written = {out for node in self.nodes.values() for out in node.output} - own
        read = {name for node in self.nodes.values() for name in node.input}
        read -= {name for d in decompositions for name in d.reads}  # the BN's own: in the optimized graph too
        self.outputs = [copied(o) for o in graph.output if o.name in written]
        # the constants only the later nodes read (the optimizer drops them from the graph it writes)
        self.initializers = [copied(t) for t in graph.initializer if t.name in read]
        for i in range(len(graph.output) - 1, -1, -1):
            if graph.output[i].name in written:
                del graph.output[i]

    def apply(self, graph: Any) -> bool:
        """Put every decomposition in its BN node's place in ``graph`` (the optimized graph, or the edited
        model); False, with ``graph`` unchanged, where a BN node is not found as the optimizing build had it."""
        nodes = list(graph.node)
        producer = {out: i for i, node in enumerate(nodes) for out in node.output}
        found: dict[int, Decomposition] = {}
        for d in self.decompositions:
            i = producer.get(d.node.output[0])
            if i is None or nodes[i].op_type != "BatchNormalization" or len(nodes[i].input) < 5:
                return False
            found[i] = d
        moved: set[int] = set()
        placed: dict[int, list[Any]] = {}
        for i in sorted(found):  # ascending: a node pulled forward for one BN is then before the later ones
            d = found[i]
            # the optimizer may rename a parameter (equal constants shared) or the input: read what it reads
            renamed = {old: new for old, new in zip(d.reads, nodes[i].input) if old != new}
            later = [self._renamed(name, renamed) for name in d.later]
            # the pool of x it reads comes after the BN in the optimizer's order: pulled forward to here
            pulled: list[Any] = []
            for node in later:
                for name in node.input:
                    self._pull(name, i, nodes, producer, moved, pulled)
            placed[i] = pulled + later
        spliced: list[Any] = []
        for i, node in enumerate(nodes):
            if i not in moved:
                spliced.extend(placed.get(i, (node,)))
        present = {t.name for t in graph.initializer}
        copy_messages(graph.initializer, (t for t in self.initializers if t.name not in present))
        copy_messages(graph.output, self.outputs)
        del graph.node[:]
        copy_messages(graph.node, spliced)
        return True

    def _renamed(self, name: str, renamed: dict[str, str]) -> Any:
        node = self.nodes[name]
        if not renamed:
            return node
        node = copied(node)
        for k, read in enumerate(node.input):
            node.input[k] = renamed.get(read, read)
        return node

    @staticmethod
    def _pull(
        name: str, position: int, nodes: list[Any], producer: dict[str, int], moved: set[int], pulled: list[Any]
    ) -> None:
        """Move the producer of ``name`` that comes after ``position`` (and its own such producers) to ``pulled``."""
        j = producer.get(name)
        if j is None or j <= position or j in moved:
            return
        moved.add(j)
        for read in nodes[j].input:
            Splice._pull(read, position, nodes, producer, moved, pulled)
        pulled.append(nodes[j])
