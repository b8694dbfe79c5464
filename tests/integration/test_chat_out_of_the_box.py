"""Chat out of the box: the openai chat example of docs/serve.md against `nestlm serve` on the shipped parent and on
the demo's outputs, `serve --chat-template FILE`, and vLLM's `chat_template_kwargs`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cli import main
from nestlm.demo import PARENT_DIR
from nestlm.serve.server import build_api
from nestlm.tasks.reasoning import test_problems
from nestlm.tokenizer import ByteTokenizer
from tests.integration.serving import Server
from tests.unit.test_scheduler import elastic_model, write_model_dir


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick demo (a step per stage; its evaluation replaced: only the written models matter here)."""
    from nestlm.demo import run_demo
    from nestlm.eval import evaluate

    mp = pytest.MonkeyPatch()
    mp.setattr(evaluate, "evaluate_models", lambda models, **kw: [{**m, "params": 1, "fraction": 1.0} for m in models])
    ov = ["stages.0.steps=1", "stages.1.steps=1", "stages.0.seq_len=64", "stages.1.seq_len=64"]
    ov += ["stages.0.batch_size=2", "stages.1.batch_size=2", "stages.0.warmup_steps=0"]
    ov += ["data.num_problems=200", "train.threads=1"]
    out = tmp_path_factory.mktemp("chat") / "demo"
    try:
        run_demo(out, quick=True, progress=False, overrides=ov)
    except Exception:  # the report of fake rows may fail: the models are written before it
        pass
    finally:
        mp.undo()
    return out


def readme_chat(server: Server, content: str = "Hi") -> tuple[str, str]:
    """The README's (and docs/serve.md's) example, as written there: model "auto", a user turn, max_tokens 64."""
    q = [{"role": "user", "content": content}]
    r = server.client().chat.completions.create(model="auto", messages=q, max_tokens=64)
    return r.model, r.choices[0].message.content


def test_every_model_the_demo_writes_carries_the_parents_chat_template(demo_out: Path) -> None:
    template = (PARENT_DIR / "chat_template.jinja").read_text()
    dirs = [demo_out / "parent-ranked", demo_out / "elastic", *sorted((demo_out / "slices").iterdir())]
    dirs += sorted((demo_out / "pruned").iterdir())
    assert len(dirs) >= 6
    for d in dirs:
        assert (d / "chat_template.jinja").read_text() == template, d


@pytest.mark.parametrize("which", ["parent", "demo-elastic", "demo-slice-50"])
def test_the_readme_chat_example_answers_with_the_problem_format(which: str, demo_out: Path, one_thread) -> None:
    """A question in the parent's format, asked through chat, gets what greedy generate gives its "Q: ...\\n"."""
    d = {"parent": PARENT_DIR, "demo-elastic": demo_out / "elastic", "demo-slice-50": demo_out / "slices" / "50"}[which]
    problem = test_problems(1, "short", 1)[0]
    question = problem.prompt.removeprefix("Q: ").strip()
    server = Server(build_api(d, max_context=512))
    try:
        name, text = readme_chat(server)
        assert name in server.api.ids and isinstance(text, str)  # answered, by a model it serves
        name, text = readme_chat(server, "f = 6. h = f + 7. l = h + 8. What is l?")  # the README's question
        assert name in server.api.ids and text.startswith("A: ")  # in the problem format, whatever the budget
        model_id = server.api.ids[-1]  # the smallest budget, or the plain model
        r = server.client().chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": question}], max_tokens=96, temperature=0
        )
    finally:
        server.close()
    model = nestlm.load(d).eval()
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(problem.prompt)])
    budget = model_id if model.budgets else None
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=96, budget=budget)
    want = tok.decode([t for t in out[0, ids.shape[1] :].tolist() if t != 2])
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == ids.shape[1]
    if which == "parent":
        assert want.startswith("A: ")  # the parent answers in its format


@pytest.fixture(scope="module")
def no_template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(elastic_model(), tmp_path_factory.mktemp("nochat") / "elastic", chat_template=None)


def test_serve_chat_template_gives_a_model_without_one_chat(no_template_dir: Path, tmp_path: Path, one_thread) -> None:
    import openai

    assert not (no_template_dir / "chat_template.jinja").exists()
    bare = Server(build_api(no_template_dir, max_context=256))
    try:
        with pytest.raises(openai.BadRequestError, match="--chat-template FILE"):
            readme_chat(bare)
    finally:
        bare.close()
    f = tmp_path / "t.jinja"
    f.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if greeting is defined %}{{ greeting }}\n{% endif %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    server = Server(build_api(no_template_dir, max_context=256, chat_template=f))
    try:
        msgs = [{"role": "user", "content": "Hi"}]
        plain = server.client().chat.completions.create(model="full", messages=msgs, max_tokens=2)
        assert plain.usage.prompt_tokens == len("user: Hi\nassistant:")
        kw = server.client().chat.completions.create(
            model="full", messages=msgs, max_tokens=2, extra_body={"chat_template_kwargs": {"greeting": "hello"}}
        )
        assert kw.usage.prompt_tokens == len("user: Hi\nhello\nassistant:")
        no_prompt = server.client().chat.completions.create(
            model="full",
            messages=msgs,
            max_tokens=2,
            extra_body={"chat_template_kwargs": {"add_generation_prompt": False}},
        )
        assert no_prompt.usage.prompt_tokens == len("user: Hi\n")
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
            server.client().chat.completions.create(
                model="full", messages=msgs, max_tokens=2, extra_body={"chat_template_kwargs": [1]}
            )
    finally:
        server.close()


def test_a_chat_template_that_cannot_be_read_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code = main(["serve", "--model", str(tmp_path / "nope"), "--port", "0", "--chat-template", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--chat-template" in err[0] and "cannot be read" in err[0], err


def test_a_model_trained_with_data_chat_template_carries_it(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """data.chat_template renders the training conversations; the model it makes is served with the same one."""
    fast = ["data.max_bytes=60000", "stages.0.steps=2", "stages.1.steps=1", "--no-progress"]
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    missing = tmp_path / "missing"
    assert main(["train", "tiny", "--out", str(missing), *fast, f"data.chat_template={tmp_path / 'nope.jinja'}"]) == 2
    assert "data.chat_template" in capsys.readouterr().err and not missing.exists()  # refused before any write
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), *fast, f"data.chat_template={template}"]) == 0
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    from nestlm.serve.api import load_chat_template

    assert load_chat_template(out) == template.read_text()
