"""Pytrees in and out, as torch.func takes them: several inputs, dict/tuple/dataclass outputs,
has_aux, per-sample data that is not differentiated, a module's keyword inputs; each through
raijac.compute on real Ray against torch.func, read back leaf by leaf with `Jacobian.tree()`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import raijac
from raijac.errors import ProblemError, StoreError
from tests.problems import assert_close

G = torch.Generator().manual_seed(11)
W = torch.randn(5, 4, generator=G, dtype=torch.float64)


def two_inputs(a: torch.Tensor, params: dict) -> dict:
    h = torch.tanh(a @ params["w"].T + params["b"])
    return {"h": h, "norm": (h**2).sum(-1, keepdim=True)}


def with_none(a: torch.Tensor, params: dict) -> dict:
    return {**two_inputs(a, params), "skip": None}  # jacrev refuses None outputs; raijac drops them


def _two_input_point():
    a = torch.randn(3, 4, generator=G, dtype=torch.float64)
    params = {"w": torch.randn(6, 4, generator=G, dtype=torch.float64), "b": torch.randn(6, generator=G, dtype=torch.float64)}
    return a, params


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd", "loop"])
def test_two_pytree_inputs_and_a_dict_output(mode, store_path):
    a, params = _two_input_point()
    problem = raijac.Problem(with_none, a, params, argnums=(0, 1))
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, block_size=4)
    ref = torch.func.jacrev(two_inputs, argnums=(0, 1))(a, params)
    tree = jac.tree()
    assert list(tree) == ["y['h']", "y['norm']"]  # None outputs are dropped, the rest in pytree order
    assert list(tree["y['h']"]) == ["args[0]", "args[1]['w']", "args[1]['b']"]  # dicts in insertion order, as torch's pytree
    for out in ("h", "norm"):
        assert_close(np.asarray(tree[f"y['{out}']"]["args[0]"]), ref[out][0].numpy())
        for name in ("w", "b"):
            assert_close(tree[f"y['{out}']"][f"args[1]['{name}']"].numpy(), ref[out][1][name].numpy())
    assert jac.shape == (3 * 6 + 3, 3 * 4 + 6 + 6 * 4)


def _same_structure(ours, ref, path: str = "J") -> int:
    """Compare a `Jacobian.unflatten()` with what torch.func returns: the same containers
    (sequences as tuples, dicts with the same keys in the same order) and the same numbers."""
    if isinstance(ref, torch.Tensor):
        assert not isinstance(ours, tuple | dict), f"{path}: a container where jacrev has a tensor"
        assert ours.shape == tuple(ref.shape), path
        assert_close(np.asarray(ours), ref.numpy())
        return 1
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), f"{path}: keys {list(ours)} != {list(ref)}"
        return sum(_same_structure(ours[k], ref[k], f"{path}[{k!r}]") for k in ref)
    assert isinstance(ours, tuple) and len(ours) == len(ref), f"{path}: {type(ours).__name__} != {type(ref).__name__}"
    return sum(_same_structure(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(ours, ref, strict=True)))


def tuple_and_dict(x: torch.Tensor, w: torch.Tensor) -> tuple:
    return (torch.einsum("...ij,...j->...i", w, x), {"s": torch.sin(x), "t": (x * 2)[..., :2]})


def nested_in(d: dict) -> dict:
    return {"o": d["a"] * d["b"][0], "p": (torch.exp(d["b"][1]),)}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0), (1,), (0,)])
@pytest.mark.parametrize("batched", [False, True])
def test_unflatten_is_what_jacrev_returns(argnums, batched, store_path):
    x = torch.randn(*(3,) * batched, 3, generator=G, dtype=torch.float64)
    w = torch.randn(*(3,) * batched, 2, 3, generator=G, dtype=torch.float64)
    jac = raijac.compute(raijac.Problem(tuple_and_dict, x, w, argnums=argnums, batched=batched), store_path, workers=2)
    ref = torch.func.jacrev(tuple_and_dict, argnums=argnums)
    ref = torch.func.vmap(ref)(x, w) if batched else ref(x, w)
    assert _same_structure(jac.unflatten(), ref) == 3 * (len(argnums) if isinstance(argnums, tuple) else 1)


class _ByKeyword(torch.nn.Module):
    """A Hugging Face-style model: every input by keyword, the embeddings one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.mix, self.head = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 5)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, scale=None) -> dict:
        h = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.mix(h)) * attention_mask[..., None]
        return {"logits": self.head(h) * (1.0 if scale is None else scale[..., None, None]), "hidden": h}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["auto", "fwd", "rev-batched"])
def test_a_keyword_input_is_differentiated_by_name(mode, store_path):
    """argnums names a keyword input (a Hugging Face model's inputs_embeds, wrt='input', no
    wrapper): the per-sample J w.r.t. it is torch.func's, the mask travels with its samples,
    and unflatten gives its block; two keywords give a tuple, as argnums=(0, 1) does."""
    torch.manual_seed(4)
    model = _ByKeyword().double().eval()
    e = torch.randn(3, 4, 8, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    mask[0, 3] = 0
    problem = raijac.Problem.from_module(
        model, kwargs={"inputs_embeds": e, "attention_mask": mask}, outputs="logits", wrt="input", argnums="inputs_embeds",
        batched=True,
    )  # fmt: skip
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, block_size=4)
    logits = lambda eb, mb: model(inputs_embeds=eb[None], attention_mask=mb[None])["logits"][0]  # noqa: E731
    want = torch.func.vmap(torch.func.jacrev(logits))(e, mask).detach()
    assert_close(jac.numpy(), want.reshape(3, 20, 32).numpy())
    assert _same_structure(jac.unflatten(), want) == 1
    scale = torch.rand(3, dtype=torch.float64) + 0.5
    both = raijac.Problem.from_module(
        model, kwargs={"inputs_embeds": e, "attention_mask": mask, "scale": scale}, outputs="logits", wrt="input",
        argnums=("scale", "inputs_embeds"), batched=True,
    )  # fmt: skip
    jac = raijac.compute(both, store_path, mode=mode, workers=2, overwrite=True)
    ref = torch.func.vmap(
        torch.func.jacrev(lambda sb, eb, mb: model(inputs_embeds=eb[None], attention_mask=mb[None], scale=sb[None])["logits"][0],
                          argnums=(0, 1))
    )(scale, e, mask)  # fmt: skip
    assert _same_structure(jac.unflatten(), tuple(r.detach() for r in ref)) == 2


@pytest.mark.usefixtures("ray_session")
def test_a_keyword_with_quotes_and_brackets_in_its_name_reads_back(store_path):
    """pytree writes a key by its repr (kwargs["it's"]): unflatten finds such inputs by name."""
    m, n = torch.randn(3, dtype=torch.float64, generator=G), torch.randn(2, dtype=torch.float64, generator=G)

    def f(x, **kw):
        return torch.cat([x * kw["it's"].sum(), torch.sin(kw["a]b"])])

    x = torch.randn(3, dtype=torch.float64, generator=G)
    problem = raijac.Problem(f, x, kwargs={"it's": m, "a]b": n}, argnums=("it's", "a]b"))
    jac = raijac.compute(problem, store_path, workers=2)
    ref = torch.func.jacrev(lambda a, b: f(x, **{"it's": a, "a]b": b}), argnums=(0, 1))(m, n)
    assert _same_structure(jac.unflatten(), ref) == 2


@pytest.mark.usefixtures("ray_session")
def test_unflatten_of_a_nested_input(store_path):
    a = torch.randn(3, generator=G, dtype=torch.float64)
    point = {"a": a, "b": [a.cos(), a]}
    jac = raijac.compute(raijac.Problem(nested_in, point), store_path, workers=2)
    assert _same_structure(jac.unflatten(), torch.func.jacrev(nested_in)(point)) == 6


def with_scalar(x: torch.Tensor, d: dict) -> dict:
    return {"a": x * d["s"] + torch.sin(d["v"]), "b": (x * d["v"]).sum()}


@pytest.mark.usefixtures("ray_session")
def test_a_zero_dim_leaf_among_the_differentiated_inputs(store_path):
    """A 0-dim leaf was cut out of the flat x with reshape() and no shape: a TypeError blamed on f."""
    x = torch.randn(4, generator=G, dtype=torch.float64)
    d = {"s": torch.tensor(0.7, dtype=torch.float64), "v": torch.randn(4, generator=G, dtype=torch.float64)}
    jac = raijac.compute(raijac.Problem(with_scalar, x, d, argnums=(0, 1)), store_path, workers=2)
    assert _same_structure(jac.unflatten(), torch.func.jacrev(with_scalar, argnums=(0, 1))(x, d)) == 6


def per_sample_loss(x: torch.Tensor, labels: torch.Tensor, *, scale: float):
    logits = x @ W.T * scale
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none"), logits.detach()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd", "rev-repeat", "fwd-repeat", "loop"])
def test_per_sample_data_travels_with_its_samples(mode, store_path):
    """Labels are per-sample inputs that are not differentiated; tiles cut the samples."""
    x = torch.randn(7, 4, generator=G, dtype=torch.float64)
    labels = torch.randint(0, 5, (7,), generator=G)
    problem = raijac.Problem(per_sample_loss, x, labels, kwargs={"scale": 2.0}, has_aux=True, batched=True)
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, block_size=1)
    assert jac.summary["tiles_total"] > 2
    ref = torch.func.vmap(torch.func.jacrev(lambda xi, li: per_sample_loss(xi[None], li[None], scale=2.0)[0][0]))(x, labels)
    assert jac.shape == (7, 1, 4)
    assert_close(jac.numpy()[:, 0], ref.numpy())


@dataclasses.dataclass
class Output:  # a stand-in for a Hugging Face ModelOutput: a dataclass with optional fields
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(13, 6)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Output:
        h = self.emb(ids) * attention_mask[..., None]
        h = torch.tanh(self.mix(h))
        return Output(logits=self.head(h[:, -1]), hidden=h)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("batched", [True, False])
def test_module_with_keyword_inputs_and_a_dataclass_output(batched, store_path):
    torch.manual_seed(2)
    net = TinyLM().double()
    ids = torch.randint(0, 13, (3, 5), generator=G)
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[1, :2] = 0
    problem = raijac.Problem.from_module(net, ids, kwargs={"attention_mask": mask}, outputs="logits", batched=batched)
    jac = raijac.compute(problem, store_path, workers=2, block_size=3)
    params = {n: p.detach() for n, p in net.named_parameters()}

    def logits(p, i, m):
        return torch.func.functional_call(net, p, (i,), {"attention_mask": m}).logits

    if batched:
        ref = torch.func.vmap(torch.func.jacrev(lambda p, i, m: logits(p, i[None], m[None])[0]), in_dims=(None, 0, 0))(
            params, ids, mask
        )
    else:
        ref = torch.func.jacrev(logits)(params, ids, mask)
    tree = jac.tree()["y"]
    assert list(tree) == list(params)
    for name in params:
        assert_close(tree[name].numpy(), ref[name].numpy())
    assert np.array_equal(jac.x, ids.numpy())


def _decoder() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(12)
    layer = torch.nn.TransformerDecoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True).double().eval()
    return layer, torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)


def _assert_decoder_jacobian(jac, layer: torch.nn.Module, causal: torch.Tensor, tgt: torch.Tensor, memory: torch.Tensor) -> None:
    """The stored per-sample parameter J of position 2, by parameter name, against
    vmap(jacrev(functional_call)) with the mask shared (in_dims=None)."""
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def at2(p, t, m):
        return torch.func.functional_call(layer, p, (t[None], m[None]), {"tgt_mask": causal})[0, 2]

    ref = torch.func.vmap(torch.func.jacrev(at2), in_dims=(None, 0, 0))(params, tgt, memory)
    tree = jac.tree()["y"]
    for name in params:
        assert_close(tree[name].numpy(), ref[name].numpy())


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(  # 6: as many samples as the mask has rows, which must not cut it
    ("batch", "mode"), [(4, "auto"), (6, "auto"), (4, "fwd"), (4, "rev-batched"), (4, "loop")]
)
def test_a_mask_shared_by_all_samples_goes_whole_to_each(batch, mode, store_path):
    """A causal mask passed as a keyword argument of a batched module problem, named in
    `shared`: every sample gets all of it (vmap's in_dims=None), the per-sample parameter J
    of position 2 (which the mask hides 3 of 6 positions from) is torch.func's, and a
    changed mask is another problem."""
    layer, causal = _decoder()
    tgt = torch.randn(batch, 6, 16, generator=G, dtype=torch.float64)
    memory = torch.randn(batch, 5, 16, generator=G, dtype=torch.float64)

    def make(mask: torch.Tensor) -> raijac.Problem:
        return raijac.Problem.from_module(
            layer, tgt, memory, kwargs={"tgt_mask": mask}, shared=("tgt_mask",), outputs=lambda o: o[:, 2], batched=True
        )

    problem = make(causal)
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, block_size=8)
    _assert_decoder_jacobian(jac, layer, causal, tgt, memory)
    assert jac.summary["tiles_total"] > 1
    unmasked = make(torch.zeros(6, 6, dtype=torch.float64))
    assert unmasked.fingerprint() != problem.fingerprint() and not torch.equal(unmasked.y, problem.y)
    with pytest.raises(StoreError, match=r"computed with another set of inputs that are neither differentiated nor per sample"):
        raijac.compute(unmasked, store_path, workers=2, resume=True)


DECODER_SPEC = """
import torch
import raijac


def problem():
    torch.manual_seed(12)
    layer = torch.nn.TransformerDecoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True).double().eval()
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    tgt = torch.randn(6, 6, 16, generator=g, dtype=torch.float64)
    memory = torch.randn(6, 5, 16, generator=g, dtype=torch.float64)
    return raijac.Problem.from_module(
        layer, tgt, memory, kwargs={"tgt_mask": causal}, shared=("tgt_mask",), outputs=lambda o: o[:, 2], batched=True
    )
"""


@pytest.mark.usefixtures("ray_session")
def test_the_cli_computes_and_verifies_a_spec_with_a_shared_mask(tmp_path):
    """A spec file whose problem passes a causal mask whole to each of its 6 samples: `raijac
    compute --verify` from the CLI, and the stored J against torch.func's."""
    from tests.test_cli import compute

    spec = tmp_path / "decoder_spec.py"
    spec.write_text(textwrap.dedent(DECODER_SPEC))
    out = tmp_path / "d.zarr"
    summary = compute(f"{spec}:problem", out, "--verify", "--no-progress")
    assert summary["tiles_computed"] == summary["tiles_total"]
    jac = raijac.open(str(out))
    scope: dict = {}
    exec(textwrap.dedent(DECODER_SPEC), scope)  # the spec's own objects, built again
    problem = scope["problem"]()
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    _assert_decoder_jacobian(jac, problem.module, causal, *problem.ctx)


def _shared_weight(v: torch.Tensor, labels: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.tanh(v @ m.T) * (1 + labels[:, None])


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd", "rev-batched", "rev-repeat", "fwd-repeat", "loop"])
def test_a_shared_positional_input_of_a_function(mode, store_path):
    """`shared` by position, for a batched input Jacobian in every mode, with tiles that cut
    the samples: f(x, labels, w), labels per sample, w the same for all of them."""
    x = torch.randn(5, 3, generator=G, dtype=torch.float64)
    labels = torch.randint(0, 3, (5,), generator=G).double()
    w = torch.randn(5, 3, generator=G, dtype=torch.float64)  # 5 rows, as many as the samples: still one w
    problem = raijac.Problem(_shared_weight, x, labels, w, batched=True, shared=(2,))
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, block_size=1)
    assert jac.summary["tiles_total"] > 2
    ref = torch.func.vmap(torch.func.jacrev(lambda v, lab, m: _shared_weight(v[None], lab[None], m)[0]), in_dims=(0, 0, None))(
        x, labels, w
    )
    assert_close(jac.numpy(), ref.numpy())


def test_problem_pickles_with_its_structure():
    from ray import cloudpickle

    a, params = _two_input_point()
    problem = raijac.Problem(two_inputs, a, params, argnums=(0, 1))
    copy = cloudpickle.loads(cloudpickle.dumps(problem))
    assert copy.fingerprint() == problem.fingerprint() and copy.in_leaves == problem.in_leaves
    assert torch.equal(copy.y, problem.y) and copy.out_leaves == problem.out_leaves


def test_structure_changes_the_fingerprint():
    a, params = _two_input_point()
    both = raijac.Problem(two_inputs, a, params, argnums=(0, 1))
    first = raijac.Problem(two_inputs, a, params, argnums=0)
    assert both.fingerprint() != first.fingerprint() and first.n_in == a.numel()


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: raijac.Problem(two_inputs, *_two_input_point(), argnums=2), r"argnums=2 must name inputs among the 2"),
        (lambda: raijac.Problem(lambda a: {"h": a}, torch.ones(2), outputs="g"), r"outputs='g' names nothing.*keys \['h'\]"),
        (lambda: raijac.Problem(lambda a: a, torch.ones(2), has_aux=True), r"has_aux=True needs f to return \(output, aux\)"),
        (
            lambda: raijac.Problem(lambda a, b: a * b, torch.ones(4, 2), torch.ones(3), batched=True),
            r"B=4 samples.*shape \(3,\)",
        ),
        (lambda: raijac.Problem(lambda a, b: a, torch.ones(2), [1.0], argnums=(0, 1)), r"args\[1\]\[0\] must be a torch.Tensor"),
        (
            lambda: raijac.Problem(lambda a, b: a + b, torch.ones(2), torch.ones(2, dtype=torch.float64), argnums=(0, 1)),
            "mix dtypes",
        ),
        (lambda: raijac.Problem(lambda a: (a, "tag"), torch.ones(2)), r"returned a str at y\[1\].*outputs="),
        (
            lambda: raijac.Problem(lambda a, b: a, torch.ones(4, 2), torch.ones(3, 2), argnums=(0, 1), batched=True),
            r"same samples.*args\[0\] has 4 and args\[1\] has 3",
        ),
        (
            lambda: raijac.Problem.from_module(
                _decoder()[0], torch.ones(4, 6, 16), kwargs={"tgt_mask": _decoder()[1]}, batched=True
            ),
            r"kwargs\['tgt_mask'\] has shape \(6, 6\); if it is the same for every sample .*shared=\('tgt_mask',\)",
        ),
        (
            lambda: raijac.Problem.from_module(
                _decoder()[0],
                torch.ones(6, 6, 16, dtype=torch.float64),
                torch.ones(6, 5, 16, dtype=torch.float64),
                kwargs={"tgt_mask": _decoder()[1]},
                batched=True,
            ),
            r"on sample 0 alone f raised .*each sample gets its own slice of args\[1\], kwargs\['tgt_mask'\].*in shared=",
        ),
        (
            lambda: raijac.Problem(lambda a, m=None: a, torch.ones(2), kwargs={"m": 1}, shared="n"),
            r"shared names 'n'.*kwargs: 'm'",
        ),
        (
            lambda: raijac.Problem(lambda a, b: a, torch.ones(2), torch.ones(2), shared=0),
            r"shared names input 0, which is differentiated",
        ),
        (
            lambda: raijac.Problem(lambda a, b: a, torch.ones(2), torch.ones(2), shared=2),
            r"shared names position 2, but there are 2",
        ),
        (
            lambda: raijac.Problem(lambda a, e=None: a, torch.ones(2), kwargs={"e": torch.ones(2)}, argnums="f"),
            r"argnums='f' must name inputs among the 1 positional inputs or the keyword inputs 'e'",
        ),
        (
            lambda: raijac.Problem(lambda e=None: e, kwargs={"e": torch.ones(4, 2)}, argnums="e", shared="e", batched=True),
            r"shared names input 'e', which is differentiated",
        ),
        (
            lambda: raijac.Problem(lambda e=None: e, kwargs={"e": torch.ones(2)}),
            r"needs the point to differentiate at.*argnums='inputs_embeds'",
        ),
        (
            lambda: raijac.Problem(lambda a, b: a * b, torch.ones(4, 2), torch.ones(()), batched=True),
            r"args\[1\] is a scalar; pass shared=\(1,\) if it is the same for every sample",
        ),
    ],
)
def test_bad_structures_are_one_clear_error(build, match):
    with pytest.raises(ProblemError, match=match):
        _ = build().y


def _classifier() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.randint(0, 10, (5,)), r"the targets to hold one entry per sample, B=4.*targets\[0\] has shape \(5,\)"),
        (torch.randint(0, 10, (4,)).float(), r"the loss raised RuntimeError .*targets\[0\] float32 \(4,\).*int64 class indices"),
        (torch.full((4,), 12), r"the loss raised .*targets\[0\] int64 \(4,\).*out of bounds.*in \[0, C\)"),
    ],
    ids=["one-label-too-many", "float-labels", "class-out-of-range"],
)
def test_bad_targets_are_named_in_one_sentence(labels, match):
    """Per-sample gradients with labels that do not fit: the error names the targets, not x or f."""
    net, x = _classifier(), torch.randn(4, 3, 4)
    with pytest.raises(ProblemError, match=match):
        _ = raijac.Problem.from_module(net, x, loss=torch.nn.functional.cross_entropy, targets=labels, batched=True).y


def test_token_ids_as_the_differentiated_input_point_to_the_parameters():
    emb = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(ProblemError, match=r"dtype torch.int64, which has no derivative \(token ids\? .*wrt='params'"):
        raijac.Problem.from_module(emb, torch.randint(0, 20, (2, 3)), wrt="input", batched=True)


SPEC = """
import torch
import raijac


def f(a, params):
    return {"h": torch.tanh(a @ params["w"].T), "s": a.sum()}


def problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g)
    params = {"w": torch.randn(5, 4, generator=g)}
    return raijac.Problem(f, a, params, argnums=(0, 1))
"""


@pytest.mark.slow
def test_cli_computes_a_pytree_spec(tmp_path):
    spec = tmp_path / "tree_spec.py"
    spec.write_text(textwrap.dedent(SPEC))
    out = tmp_path / "t.zarr"
    run = subprocess.run(
        [sys.executable, "-m", "raijac", "compute", f"{spec}:problem", "--out", str(out), "--workers", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import tree_spec
    finally:
        sys.path.remove(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g)
    params = {"w": torch.randn(5, 4, generator=g)}
    ref = torch.func.jacrev(tree_spec.f, argnums=(0, 1))(a, params)
    tree = raijac.open(str(out)).tree()
    assert_close(tree["y['h']"]["args[1]['w']"].numpy(), ref["h"][1]["w"].numpy())
    assert_close(tree["y['s']"]["args[0]"].numpy(), ref["s"][0].numpy())


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["auto", "rev", "loop"])
def test_per_sample_gradients_of_a_loss_with_labels(mode, store_path):
    """from_module(loss=..., targets=labels, batched=True): each sample's gradient of its own
    loss (cross_entropy's default mean reduction applied to that sample alone), as vmap(grad)."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 5)
    ).double()
    x = torch.randn(9, 1, 6, 6, generator=G, dtype=torch.float64)
    labels = torch.randint(0, 5, (9,), generator=G)
    problem = raijac.Problem.from_module(
        net, x, loss=torch.nn.functional.cross_entropy, targets=labels, wrt="params", batched=True
    )
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, block_size=1)
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(net, p, (xi[None],)), yi[None])

    ref = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    tree = jac.tree()["y"]
    for name in params:
        assert_close(tree[name].numpy(), ref[name].numpy())  # (B, *parameter shape): one scalar loss per sample
    assert jac.shape == (9, 1, sum(p.numel() for p in params.values()))


def test_targets_need_a_loss():
    with pytest.raises(ProblemError, match="targets are inputs of a loss"):
        raijac.Problem(lambda a: a, torch.ones(2), targets=torch.ones(2))
