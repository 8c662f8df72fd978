import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_zero_init
from huggingface_hub import ModelCard

import train_hf
from dataset_scripts import RankDiffusionCollator, load_expression_data
from metrics import PerGeneMarginal
from modeling import CellTokenizer, RankDiTConfig, RankDiTModel, RankDiTProcessor, rank_tokens
from pipelines import MaskedRankDiffusionPipeline, MaskedRankDiffusionScheduler, ReferenceCells
from training import RankDiffTrainingArguments, RankDiffusionTrainer, evaluate_masked_diffusion
from training.data import PANELS
from training.outputs import MANIFEST


class MarginalModel(torch.nn.Module):
    """Predicts every position from its gene alone: the per-gene marginal, whatever the context."""

    def __init__(self, baseline: PerGeneMarginal):
        super().__init__()
        self.baseline = baseline

    def forward(self, gene_ids, input_ids, attention_mask=None, timesteps=None):
        return type("Output", (), {"logits": self.baseline.log_probs(gene_ids)})()


def _toy_cells(n_cells=24, n_genes=40, num_bins=10, seed=0):
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        genes = np.arange(3, 3 + n_genes)
        counts = rng.poisson(rng.uniform(0.2, 4.0, n_genes)).astype(float)
        counts[0] = max(counts[0], 1)
        cells.append((genes, rank_tokens(counts, num_bins)))
    return cells


def test_nelbo_of_the_marginal_model_equals_the_baseline_nll():
    cells = _toy_cells()
    baseline = PerGeneMarginal(num_rank_bins=10, gene_vocab_size=50).fit(cells)
    gene_ids = torch.from_numpy(np.stack([g for g, _ in cells]))
    tokens = torch.from_numpy(np.stack([t for _, t in cells]))
    batch = {"gene_ids": gene_ids, "input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10)
    scores = evaluate_masked_diffusion(MarginalModel(baseline), scheduler, [batch], baseline, time_grid=256)
    # The per-gene marginal by hand: each gene's token frequencies over the cells, + 1 pseudo-count spread evenly.
    counts = np.zeros((50, 11))
    for genes, cell_tokens in cells:
        np.add.at(counts, (genes, cell_tokens), 1.0)
    table = (counts + 1 / 11) / (len(cells) + 1)
    nll = -np.log(table[gene_ids.numpy(), tokens.numpy()])
    # E_t[-alpha'(t)] = 1 - eps for the log-linear schedule, so the NELBO is the mean NLL up to that factor.
    assert scores["nelbo"] == pytest.approx(nll.mean() * (1 - 1e-3), rel=0.02)
    # Half of each cell masked, drawn as the evaluation draws it: the model and the baseline score those positions.
    masked = scheduler.random_mask(
        torch.ones_like(tokens, dtype=torch.bool), 0.5, generator=torch.Generator().manual_seed(0)
    )
    assert scores["masked_nll_0.5"] == pytest.approx(nll[masked.numpy()].mean(), rel=1e-5)
    assert scores["baseline_masked_nll_0.5"] == pytest.approx(nll[masked.numpy()].mean(), rel=1e-5)


def test_marginal_baseline_counts_unlisted_genes_as_zero():
    baseline = PerGeneMarginal(num_rank_bins=2, gene_vocab_size=6, pseudocount=0.0)
    baseline.fit([(np.array([3, 4]), np.array([1, 2])), (np.array([3]), np.array([2]))])
    probabilities = baseline.probabilities()
    np.testing.assert_allclose(probabilities[3], [0.0, 0.5, 0.5])
    np.testing.assert_allclose(probabilities[4], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(probabilities[5], [1.0, 0.0, 0.0])


@pytest.fixture
def small_trainer(tmp_path):
    rows = load_expression_data().rows.select(range(48))
    train_rows, eval_rows = rows.select(range(40)), rows.select(range(40, 48))
    config = RankDiTConfig.from_preset("tiny", gene_vocab_size=62757, max_length=64)
    torch.manual_seed(0)
    model = RankDiTModel(config)
    tokenizer = CellTokenizer(max_length=64)
    processor = RankDiTProcessor(num_rank_bins=tokenizer.num_bins)
    baseline = PerGeneMarginal(50, 62757)
    args = RankDiffTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return RankDiffusionTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=RankDiffusionCollator(processor, tokenizer),
        noise_scheduler=MaskedRankDiffusionScheduler(),
        eval_collator=RankDiffusionCollator(
            RankDiTProcessor(num_rank_bins=tokenizer.num_bins), tokenizer, rule="expressed"
        ),
        baseline=baseline,
    )


def test_loss_is_divided_by_num_items_in_batch(small_trainer):
    inputs = next(iter(small_trainer.get_train_dataloader()))
    real = int(inputs["attention_mask"].sum())
    torch.manual_seed(5)
    per_token = small_trainer.compute_loss(small_trainer.model, inputs)
    torch.manual_seed(5)
    over_items = small_trainer.compute_loss(small_trainer.model, inputs, num_items_in_batch=torch.tensor(3 * real))
    torch.testing.assert_close(over_items * 3, per_token)


def test_each_process_evaluates_the_share_of_its_global_rank_on_every_node(small_trainer, monkeypatch):
    # Process 3 of 4 on two machines of two (local rank 1): it scores the 4th quarter of the cells, not the 2nd.
    arguments = type(small_trainer.args)
    monkeypatch.setattr(arguments, "process_index", property(lambda self: 3))
    monkeypatch.setattr(arguments, "local_process_index", property(lambda self: 1))
    monkeypatch.setattr(arguments, "world_size", property(lambda self: 4))
    cells = small_trainer.get_eval_dataloader().dataset["BARCODE_SUB_LIB_ID"]
    assert cells == small_trainer.eval_dataset["BARCODE_SUB_LIB_ID"][6:8]


def test_trainer_counts_real_tokens_over_accumulated_batches(small_trainer):
    loader = iter(small_trainer.get_train_dataloader())
    batches = [next(loader), next(loader)]
    counted = small_trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    assert int(counted) == sum(int(b["attention_mask"].sum()) for b in batches)


def test_evaluation_rejects_a_mask_ratio_that_the_schedule_cannot_reach(small_trainer):
    small_trainer.eval_mask_ratio = 1.0
    with pytest.raises(ValueError, match="mask_ratio"):
        small_trainer.evaluate()


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(small_trainer):
    before = small_trainer.evaluate()
    assert before["eval_loss"] == before["eval_nelbo"]
    before = before["eval_nelbo"]
    small_trainer.train()
    after = small_trainer.evaluate()["eval_nelbo"]
    assert after < before - 0.08, (before, after)  # from the copy head's start, already near 2.5


class FixedDistribution(torch.nn.Module):
    """Predicts the same distribution at every position (a parameter, so the Trainer has something to train)."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.log(torch.tensor(probs)))
        self.config = RankDiTConfig(num_rank_bins=len(probs) - 1, gene_vocab_size=50)

    def forward(self, gene_ids, input_ids, attention_mask=None, timesteps=None):
        return type("Output", (), {"logits": self.log_probs.expand(*input_ids.shape, -1)})()


@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_trainer_loss_is_the_hand_computed_nelbo(tmp_path, schedule):
    probs = [0.5, 0.3, 0.2]
    model = FixedDistribution(probs)
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=2, noise_schedule=schedule, eps=0.1)
    args = RankDiffTrainingArguments(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no")
    trainer = RankDiffusionTrainer(model=model, args=args, noise_scheduler=scheduler, ordinal_term="none")
    inputs = {
        "gene_ids": torch.tensor([[3, 4, 5], [6, 7, 0]]),
        "input_ids": torch.tensor([[0, 2, 1], [1, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    masked = torch.tensor([[True, True, False], [False, True, False]])
    times = torch.tensor([0.5, 0.25])
    trainer._global_strata_timesteps = lambda batch_size, device: times
    scheduler.add_noise = lambda original, timesteps, **kwargs: original.masked_fill(masked, 3)
    if schedule == "log-linear":
        weights = [1 / 0.5, 1 / 0.25]
    else:
        weights = [(math.pi / 2) * math.sin(math.pi * t / 2) / (1 - math.cos(math.pi * t / 2)) for t in (0.5, 0.25)]
    # masked: token 0 (p 0.5) and token 2 (p 0.2) at t = 0.5, token 0 (p 0.5) at t = 0.25; 5 real tokens
    expected = ((-math.log(0.5) - math.log(0.2)) * weights[0] - math.log(0.5) * weights[1]) / 5
    assert trainer.compute_loss(model, inputs).item() == pytest.approx(expected, rel=1e-5)


class CopyVisible(torch.nn.Module):
    """Certain of the visible tokens, uniform over the B + 1 tokens where masked."""

    def forward(self, gene_ids, input_ids, attention_mask=None, timesteps=None):
        visible = input_ids <= 10
        copied = torch.nn.functional.one_hot(input_ids.clamp(max=10), 11).float() * 50.0
        return type("Output", (), {"logits": torch.where(visible[..., None], copied, torch.zeros_like(copied))})()


def test_evaluation_scores_masked_positions_only():
    cells = _toy_cells()
    baseline = PerGeneMarginal(num_rank_bins=10, gene_vocab_size=50).fit(cells)
    tokens = torch.from_numpy(np.stack([t for _, t in cells]))
    gene_ids = torch.from_numpy(np.stack([g for g, _ in cells]))
    batch = {"gene_ids": gene_ids, "input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10)
    scores = evaluate_masked_diffusion(CopyVisible(), scheduler, [batch], baseline, time_grid=4)
    # Scoring the visible positions too would pull the NLL far below log(11), the uniform's.
    assert scores["masked_nll_0.5"] == pytest.approx(math.log(11), rel=1e-6)
    assert scores["masked_tokens"] == pytest.approx(0.5 * tokens.numel())


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi` at the network boundary: records what would be uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message=None, allow_patterns=None, ignore_patterns=None):
        from huggingface_hub.utils import filter_repo_objects

        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        uploaded = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        # What is on disk when the upload starts is what the repo gets.
        self.calls.append(("upload_folder", repo_id, uploaded, (root / "README.md").read_text()))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """train_hf.py on the embedded sample for a few steps, with a checkpoint, the card and a (recorded) push."""
    out = tmp_path_factory.mktemp("run") / "demo"
    out.mkdir()
    (out / "my_analysis.py").write_text("print('a user keeps scripts here')\n")  # never deleted, never uploaded
    RecordingHfApi.calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_hf, "HfApi", RecordingHfApi)
        trainer, metrics = train_hf.main(
            [
                "--output_dir",
                str(out),
                "--max_steps",
                "4",
                "--save_strategy",
                "steps",
                "--save_steps",
                "2",
                "--max_length",
                "48",
                "--per_device_train_batch_size",
                "4",
                "--max_eval_cells",
                "8",
                "--eval_time_grid",
                "2",
                "--card_gif_steps",
                "4",
                "--push_to_hub",
                "--hub_model_id",
                "someone/rankdiff-test",
                "--hub_token",
                "hf_fake",
                "--use_cpu",
                "--disable_tqdm",
                "true",
            ]
        )
    return out, trainer, metrics, list(RecordingHfApi.calls)


@pytest.mark.slow
def test_train_hf_writes_a_loadable_pipeline_folder(trained_run, tmp_path):
    out, trainer, metrics, _ = trained_run
    saved = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_nelbo", "eval_masked_nll_0.5", "eval_baseline_masked_nll_0.5"):
        assert np.isfinite(saved[key]) and saved[key] == metrics[key]
    for name in (
        "model/preprocessor_config.json",
        "processor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (out / name).exists(), name

    # Fresh processes, outside the repo, that never import the project: the folder as written, then as re-saved
    # by a user who loaded it with diffusers, loads every way the README shows, with the trained model's logits.
    model = trainer.model.eval()
    generator = torch.Generator().manual_seed(0)
    gene_ids = torch.randint(3, model.config.gene_vocab_size, (2, 16), generator=generator)
    input_ids = torch.randint(0, 52, (2, 16), generator=generator)
    torch.save({"gene_ids": gene_ids, "input_ids": input_ids}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(gene_ids=gene_ids, input_ids=input_ids).logits
    genes, counts = [["TP53", "CD3E", "LYZ", "MS4A1", "GAPDH", "ACTB"]], [[0, 2, 9, 1, 30, 55]]
    resaved = tmp_path / "resaved"
    script = f"""
import sys, torch
from diffusers import DiffusionPipeline
from transformers import AutoFeatureExtractor, AutoModel, pipeline

folder = sys.argv[1]
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
model = AutoModel.from_pretrained(folder, subfolder="model", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
processor = AutoFeatureExtractor.from_pretrained(folder, subfolder="model", trust_remote_code=True)
assert processor.gene_vocab.encode(["TP53"])
task = pipeline(model=folder + "/model", trust_remote_code=True)
hub_form = pipeline(model=folder, model_kwargs={{"subfolder": "model"}}, trust_remote_code=True)
assert type(hub_form.feature_extractor).__name__ == "RankDiTProcessor"
probs = task(gene_ids={genes[0]!r}, counts={counts[0]!r}, mask=[False, True, False, True, False, False])["probs"]
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
assert not {{"modeling", "pipelines", "train_hf"}} & set(sys.modules)
sampled = pipe(gene_ids={genes!r}, counts={counts!r}, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
torch.save({{"logits": model(**inputs).logits, "pipe_logits": pipe.model(**inputs).logits, "probs": probs,
            "sampled": torch.from_numpy(sampled.ranks)}}, sys.argv[2])
if len(sys.argv) > 3:
    pipe.save_pretrained(sys.argv[3])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for folder, result, *resave in ((out, "first.pt", resaved), (resaved, "second.pt")):
        args = [sys.executable, "-c", script, str(folder), str(tmp_path / result), *map(str, resave)]
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    first, second = (torch.load(tmp_path / name, weights_only=False) for name in ("first.pt", "second.pt"))
    for result in (first, second):
        torch.testing.assert_close(result["logits"], expected)
        torch.testing.assert_close(result["pipe_logits"], expected)
    np.testing.assert_array_equal(first["probs"], second["probs"])
    processor = RankDiTProcessor.from_pretrained(out / "processor")
    scheduler = MaskedRankDiffusionScheduler.from_pretrained(out / "scheduler")
    assert (resaved / "reference" / "config.json").exists()  # the reference cells travel with the folder
    reference = ReferenceCells.from_pretrained(out / "reference")
    torch.testing.assert_close(reference.tokens, trainer.reference.tokens)
    pipe = MaskedRankDiffusionPipeline(model=model, scheduler=scheduler, processor=processor, reference=reference)
    sampled = pipe(gene_ids=genes, counts=counts, mask_ratio=0.5, generator=torch.Generator().manual_seed(3)).ranks
    for result in (first, second):
        np.testing.assert_array_equal(result["sampled"].numpy(), sampled)


def test_a_run_records_every_argument_and_reads_them_back(trained_run):
    out, trainer, *_ = trained_run
    text = (out / train_hf.TRAIN_ARGS).read_text()
    assert "hf_fake" not in text  # the token given on the command line is never written
    recorded = json.loads(text)
    assert (recorded["max_steps"], recorded["max_length"], recorded["card_gif_steps"]) == (4, 48, 4)
    assert recorded["output_dir"] == str(out) and recorded["push_to_hub"] is True
    model_args, data_args, diffusion_args, training_args, card_args = train_hf.parse_arguments(
        [str(out / "train_args.json")]
    )
    assert (training_args.max_steps, data_args.max_length, card_args.card_gif_steps) == (4, 48, 4)
    assert training_args.learning_rate == trainer.args.learning_rate and training_args.hub_token is None
    assert train_hf.arguments_record(model_args, data_args, diffusion_args, training_args, card_args) == recorded


def test_arguments_from_a_json_file_are_those_of_the_same_flags(tmp_path):
    flags = ["--output_dir", str(tmp_path / "run"), "--learning_rate", "0.003", "--panel_share", "0.5",
             "--ordinal_term", "none", "--preset", "small", "--card_mask_ratios", "0.3", "0.6"]  # fmt: skip
    from_flags = train_hf.parse_arguments(flags)
    (tmp_path / "args.json").write_text(json.dumps(train_hf.arguments_record(*from_flags)))
    from_file = train_hf.parse_arguments([str(tmp_path / "args.json")])
    assert train_hf.arguments_record(*from_file) == train_hf.arguments_record(*from_flags)
    _, data_args, _, training_args, card_args = from_file
    assert (training_args.learning_rate, data_args.panel_share, card_args.card_mask_ratios) == (0.003, 0.5, [0.3, 0.6])
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 0.003, "no_such_flag": 1}))
    with pytest.raises(ValueError, match="no_such_flag"):
        train_hf.parse_arguments([str(tmp_path / "bad.json")])


def test_every_flag_is_documented():
    parser = train_hf.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"--{action.dest} has no help"
    assert "--zero_share" in parser.format_help() and "--learning_rate" in parser.format_help()


def test_mixed_loss_adds_the_weighted_ordinal_term_and_logs_the_nelbo_apart(small_trainer):
    inputs = next(iter(small_trainer.get_train_dataloader()))
    model = randomize_zero_init(small_trainer.model)
    small_trainer.ordinal = ("none", 1.0, "nelbo")
    torch.manual_seed(5)
    plain = small_trainer.compute_loss(model, inputs)
    nelbo = float(small_trainer._loss_parts["nelbo"])
    assert nelbo == pytest.approx(plain.item())
    small_trainer.ordinal = ("rps", 2.0, "nelbo")
    torch.manual_seed(5)
    mixed = small_trainer.compute_loss(model, inputs)
    ordinal = float(small_trainer._loss_parts["ordinal"])
    assert ordinal > 0 and mixed.item() == pytest.approx(plain.item() + 2.0 * ordinal, rel=1e-5)
    logs = {"loss": mixed.item()}
    small_trainer.log(logs)
    # two micro-batches (both NELBOs, one ordinal term) make two steps without accumulation
    assert logs["nelbo"] == pytest.approx(nelbo, abs=1e-3) and logs["ordinal"] == pytest.approx(ordinal / 2, abs=1e-3)
    assert small_trainer._loss_parts == {"nelbo": 0.0, "ordinal": 0.0} and small_trainer._loss_parts_calls == 0


def test_card_headline_puts_the_lower_nll_in_bold_whichever_method_has_it():
    from types import SimpleNamespace

    from training.model_card import headline

    def run(model: float, magic: float, rates: float):
        nll = {"RankDiT, one pass": model, "MAGIC": magic, "nearest cells' rates": rates}
        by_method = {name: {"0.2": {"nll_all": 9.0}, "0.5": {"nll_all": value}} for name, value in nll.items()}
        return SimpleNamespace(imputation={"random detected genes": by_method})

    assert headline(run(0.703, 0.752, 0.699)) == (
        "random detected genes: 0.703 vs **0.699** (nearest cells' rates), 50% masked"
    )
    assert headline(run(0.470, 0.518, 0.475)) == (
        "random detected genes: **0.470** vs 0.475 (nearest cells' rates), 50% masked"
    )
    assert headline(run(1.3702, 1.5, 1.3698)).startswith("random detected genes: **1.370** vs **1.370**")


@pytest.mark.slow
def test_model_card_parses_and_matches_the_run(trained_run):
    out, trainer, metrics, _ = trained_run
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    config = trainer.model.config
    assert data["library_name"] == "diffusers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "other" and {"single-cell", "masked-diffusion", "custom_code"} <= set(data["tags"])
    assert data["datasets"] == ["celltypist_sample"]
    report = json.loads((out / "imputation_results.json").read_text())
    assert report["split"] == "test" and set(report["results"]) == set(PANELS)
    assert set(report["baseline_choices"]) == {"cell-aware marginal", "nearest cells", "MAGIC", "nearest cells' rates"}
    results = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    for panel, by_method in report["results"].items():
        assert {"per-gene marginal", "cell-aware marginal"} <= set(by_method)
        assert {m.split(" (")[0] for m in by_method} >= {"nearest cells", "MAGIC", "nearest cells' rates"}
        model_scores = by_method["RankDiT, one pass"]
        assert set(model_scores) == {"0.2", "0.5", "0.8", "0.95"}
        for ratio, scores in model_scores.items():
            config_key = f"panel={panel}, mask_ratio={ratio}"
            assert results[("nll", config_key)] == pytest.approx(scores["nll_all"], abs=1e-4)
            assert results[("spearmanr", config_key)] == pytest.approx(scores["spearman_level_all"], abs=1e-4)
        assert "mae_level_all" in model_scores["0.5"] and any(
            k.startswith("nll_detected_") for k in model_scores["0.5"]
        )
    vocab = RankDiTProcessor.from_pretrained(out / "processor").gene_vocab
    assert len(data["widget"]) == 2
    for widget in data["widget"]:
        example = widget["structured_data"]
        assert len(example["gene_ids"]) == len(example["ranks"]) == len(example["mask"]) == 12
        assert all(vocab.lookup(example["gene_ids"]) >= 3) and 0 < sum(example["mask"]) < 12
        assert all(0 <= r <= config.num_rank_bins for r in example["ranks"])
    text = card.text
    assert f"{trainer.model.num_parameters() / 1e6:.2f}M" in text and "4 optimizer steps of 4 cells" in text
    assert f"up to {config.max_length} (gene, rank) pairs" in text and f"{config.gene_vocab_size:,} ids" in text
    model_nll = report["results"]["training panel"]["RankDiT, one pass"]["0.5"]["nll_all"]
    shown = re.escape(f"{model_nll:.3f}")  # in bold when it is the lower NLL
    assert re.search(rf"training panel: (\*\*)?{shown}(\*\*)? vs", text) and "AutoModel.from_pretrained" in text
    assert 'DiffusionPipeline.from_pretrained("someone/rankdiff-test"' in text


@pytest.mark.slow
def test_every_plot_the_card_links_exists_and_is_an_image(trained_run):
    from PIL import Image

    out, *_ = trained_run
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", ModelCard.load(out / "README.md").text)
    expected = {"count_histogram.png", "rank_tokens.png", "loss_curves.png", "metrics_vs_mask_ratio.png",
                "reliability.png", "denoising_high_corruption.gif", "denoising_low_corruption.gif"}  # fmt: skip
    assert {Path(link).name for link in links} == expected
    for link in links:
        with Image.open(out / link) as image:
            assert image.width > 300 and image.height > 200
            if link.endswith(".gif"):
                assert image.n_frames > 4  # masked input, the steps, the held last frame


@pytest.mark.slow
def test_push_to_hub_uploads_the_finished_folder_without_checkpoints(trained_run):
    out, *_, calls = trained_run
    assert (out / "checkpoint-2").is_dir()  # it was there to be left out
    (create, repo_id, private, exist_ok, token), *_, upload = calls  # created first: a bad token fails early
    assert (create, repo_id, exist_ok, token) == ("create_repo", "someone/rankdiff-test", True, "hf_fake")
    _, repo_id, files, readme = upload
    assert repo_id == "someone/rankdiff-test"
    assert not any(f.startswith("checkpoint-") for f in files) and "my_analysis.py" not in files
    assert (out / "my_analysis.py").exists()
    required = ["README.md", "model_index.json", "model/model.safetensors", "model/config.json"]
    required += ["scheduler/scheduler_config.json", "plots/loss_curves.png", "imputation_results.json"]
    assert set(required) <= set(files)
    assert readme == (out / "README.md").read_text()  # the card was complete before the upload began
    # Every name the run wrote is one the start-of-run clash check knows: a user's file of that name is refused early.
    assert {f.split("/")[0] for f in files} - {MANIFEST} <= train_hf.run_output_names()


@pytest.mark.slow
def test_rankdiff_impute_round_trips_an_h5ad_of_the_sample_cells(trained_run, tmp_path):
    import anndata
    import scipy.sparse

    import rankdiff_cli
    from dataset_scripts import cell_counts

    out, *_ = trained_run
    source = load_expression_data()
    rows = [source.rows[i] for i in range(12)]
    cells = [cell_counts(row) for row in rows]
    genes = np.unique(np.concatenate([g for g, _ in cells]))[:400]
    counts = np.zeros((len(cells), len(genes)))
    for i, (g, c) in enumerate(cells):
        keep = np.isin(g, genes)
        counts[i, np.searchsorted(genes, g[keep])] = c[keep]
    hidden = np.random.default_rng(0).random(counts.shape) < 0.1
    adata = anndata.AnnData(scipy.sparse.csr_matrix(np.where(hidden, np.nan, counts)))
    adata.var_names = source.vocab.decode(genes)  # Ensembl ids, as an AnnData from a pipeline would hold
    adata.obs_names = [row["BARCODE_SUB_LIB_ID"] for row in rows]
    adata.write_h5ad(tmp_path / "in.h5ad")
    argv = ["impute", str(tmp_path / "in.h5ad"), str(tmp_path / "out.h5ad"), "--model", str(out)]
    assert rankdiff_cli.main([*argv, "--num_inference_steps", "4", "--cell_batch_size", "5"]) == 0
    result = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert list(result.obs_names) == list(adata.obs_names) and list(result.var_names) == list(adata.var_names)
    ranks, expected = result.layers["rankdiff_ranks"], result.layers["rankdiff_expected"]
    assert (ranks[hidden] >= 0).all() and (ranks[hidden] <= 50).all() and np.isfinite(expected[hidden]).all()
    assert (ranks[~hidden] == -1).all() and np.isnan(expected[~hidden]).all()
    # The command is the pipeline's impute_anndata with its flags passed through: the same values, draw for draw.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe.impute_anndata(
        adata, num_inference_steps=4, cell_batch_size=5, generator=torch.Generator().manual_seed(0)
    )
    np.testing.assert_array_equal(ranks, direct.layers["rankdiff_ranks"])
    np.testing.assert_allclose(expected, direct.layers["rankdiff_expected"], equal_nan=True)
    # By hand: the cell lists its expressed visible genes, its masked ones and the genes masked in any cell; the
    # expected rank at a masked entry is the mean of the one-pass distribution of the model given them.
    listed = ((counts[0] > 0) & ~hidden[0]) | hidden[0] | hidden.any(axis=0)
    cell = pipe(gene_ids=[list(adata.var_names[listed])], counts=[np.where(hidden[0], np.nan, counts[0])[listed]],
                mask=[hidden[0][listed]], context_counts=[[]], output_type="expected")  # fmt: skip
    np.testing.assert_allclose(expected[0, listed], np.where(hidden[0][listed], cell.expected[0], np.nan), rtol=1e-5)
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        rankdiff_cli.main(argv)
    with pytest.raises(SystemExit, match="no layer 'mask'"):
        rankdiff_cli.main([*argv, "--overwrite", "--mask_layer", "mask"])
    # A reference of the user's own cells (read with the same rule), or none, as the call does.
    own = anndata.AnnData(scipy.sparse.csr_matrix(counts), var=adata.var)
    own.write_h5ad(tmp_path / "own.h5ad")
    for flags, reference in ((["--reference", str(tmp_path / "own.h5ad")], own), (["--no_reference"], False)):
        assert rankdiff_cli.main([*argv, "--overwrite", "--num_inference_steps", "4", *flags]) == 0
        direct = pipe.impute_anndata(adata, num_inference_steps=4, reference=reference,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip
        result = anndata.read_h5ad(tmp_path / "out.h5ad")
        np.testing.assert_allclose(result.layers["rankdiff_expected"], direct.layers["rankdiff_expected"],
                                   equal_nan=True, rtol=1e-5)  # fmt: skip
        assert np.abs(np.nan_to_num(result.layers["rankdiff_expected"] - expected)).max() > 1e-3
    with pytest.raises(SystemExit, match="--reference .* is not a file"):
        rankdiff_cli.main([*argv, "--overwrite", "--reference", str(tmp_path / "missing.h5ad")])


def test_the_trainer_and_the_benchmark_report_one_masked_nll(tiny_config):
    """The trainer's evaluation and `compare_on_masks` (the benchmark and the card) score the same validation cells
    on the same masks with one computation: the same masked NLL."""
    from metrics.imputation import MODEL_METHOD, compare_on_masks
    from training import DataArguments
    from training.data import prepare_data

    data = prepare_data(DataArguments(max_eval_cells=16, max_length=64, panel_size=64), num_bins=10)
    config = RankDiTConfig(**{**tiny_config.to_dict(), "gene_vocab_size": data.source.vocab.size})
    torch.manual_seed(0)
    model = randomize_zero_init(RankDiTModel(config).eval())
    scheduler = MaskedRankDiffusionScheduler(num_rank_bins=10)
    tokenizer = CellTokenizer(num_bins=10, max_length=64, panel=data.panel)
    processor = RankDiTProcessor.from_model_config(config, gene_vocab=data.source.vocab)
    collator = RankDiffusionCollator(processor, tokenizer, rule="panel")
    rows = list(data.validation_rows)
    batches = [collator(rows[i : i + 5]) for i in range(0, len(rows), 5)]
    trainer_scores = evaluate_masked_diffusion(model, scheduler, batches, data.baseline, time_grid=1, seed=3)
    pipe = MaskedRankDiffusionPipeline(model=model, scheduler=scheduler, processor=processor)
    cells = data.panel_cells(data.validation_rows, data.panel, processor)
    report = compare_on_masks(pipe, cells, {}, [0.5], seed=3)
    assert report[MODEL_METHOD]["0.5"]["positions_all"] == trainer_scores["masked_tokens"]
    assert report[MODEL_METHOD]["0.5"]["nll_all"] == pytest.approx(trainer_scores["masked_nll_0.5"], rel=1e-5)
