"""datasets.py: real UCI files from the shared data root, the bundled
scikit-learn sets, torchvision's on-disk format and PTB text, and the
one-line errors for every user mistake. Nothing here touches the network."""
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
from errors import UserError

REPO = Path(__file__).resolve().parent.parent

# folder, registry name, rows, inputs, train, validation, test (README table), validation_proportion
UCI_TABLE = [
    ("boston", "UCI_Boston", 506, 13, 364, 91, 51, 0.2),
    ("concrete", "UCI_Concrete", 1030, 8, 742, 185, 103, 0.2),
    ("energy", "UCI_Energy", 768, 8, 614, 78, 76, 0.11272),
    ("kin8nm", "UCI_Kin8nm", 8192, 8, 5898, 1475, 819, 0.2),
    ("naval", "UCI_Naval", 11934, 16, 8593, 2148, 1193, 0.2),
    ("power", "UCI_Power", 9568, 4, 6889, 1722, 957, 0.2),
    ("wine", "UCI_Wine", 1599, 11, 1151, 288, 160, 0.2),
    ("yacht", "UCI_Yacht", 308, 6, 222, 55, 31, 0.2),
]


@pytest.fixture(scope="module")
def shared_root():
    """The shared data root ($HYPERGRAD_DATA, as CI sets it, else ../shared/data)."""
    root = Path(os.environ.get("HYPERGRAD_DATA") or REPO.parent / "shared" / "data")
    if not (root / "uci").is_dir():
        pytest.skip(f"no UCI data under {root}; set HYPERGRAD_DATA")
    return root


def raw_uci(root, folder, inputs):
    """The permuted raw rows, read independently of datasets.py."""
    table = np.loadtxt(root / "uci" / folder / "data.txt")
    permutation = np.loadtxt(root / "uci" / folder / "permutation_indices.txt", dtype=int)
    table = torch.tensor(table[permutation], dtype=torch.float32)
    return table[:, :inputs], table[:, inputs:inputs + 1]


def assert_one_line(error, *fragments):
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("folder, name, rows, inputs, train, validation, test, proportion", UCI_TABLE)
def test_uci_split_sizes_match_the_paper(shared_root, folder, name, rows, inputs, train, validation,
                                         test, proportion):
    data = datasets.load_data({"class": name}, validation_proportion=proportion, data_root=shared_root)
    assert data.training_inputs.shape == (train, inputs)
    assert data.validation_inputs.shape == (validation, inputs)
    assert data.test_inputs.shape == (test, inputs)
    assert data.training_targets.shape == (train, 1) and data.training_targets.dtype == torch.float32
    assert (data.task, data.output_size, data.input_shape, data.name) == ("regression", 1, (inputs,), name)
    assert train + validation + test == rows
    # The paper's test split is the last round(0.1 n) rows, except energy (76, not 77).
    assert (test == round(0.1 * rows)) == (folder != "energy")


def test_uci_rows_follow_the_permutation_pool_first_validation_last(shared_root):
    inputs, targets = raw_uci(shared_root, "energy", 8)
    data = datasets.load_data({"class": "UCI_Energy", "normalise_inputs": False, "normalise_outputs": False},
                              validation_proportion=0.11272, data_root=shared_root)
    assert torch.equal(data.training_inputs, inputs[:614])
    assert torch.equal(data.validation_inputs, inputs[614:692])
    assert torch.equal(data.test_inputs, inputs[692:])
    assert torch.equal(data.test_targets, targets[692:])
    assert data.target_scale is None


def test_uci_naval_uses_16_inputs_and_the_17th_column_as_target(shared_root):
    table = np.loadtxt(shared_root / "uci" / "naval" / "data.txt")
    permutation = np.loadtxt(shared_root / "uci" / "naval" / "permutation_indices.txt", dtype=int)
    data = datasets.load_data({"class": "UCI_Naval", "normalise_inputs": False, "normalise_outputs": False},
                              validation_proportion=0.2, data_root=shared_root)
    expected = torch.tensor(table[permutation[:5], 16:17], dtype=torch.float32)
    assert torch.equal(data.training_targets[:5], expected)


@pytest.mark.parametrize("folder, name, inputs, proportion", [
    ("energy", "UCI_Energy", 8, 0.11272), ("naval", "UCI_Naval", 16, 0.2), ("wine", "UCI_Wine", 11, 0.2)])
def test_uci_normalisation_uses_pool_statistics(shared_root, folder, name, inputs, proportion):
    data = datasets.load_data({"class": name, "normalise_inputs": True, "normalise_outputs": True},
                              validation_proportion=proportion, data_root=shared_root)
    pool_inputs = torch.cat([data.training_inputs, data.validation_inputs]).double()
    pool_targets = torch.cat([data.training_targets, data.validation_targets]).double()
    assert torch.isfinite(pool_inputs).all() and torch.isfinite(data.test_inputs).all()
    raw_inputs, _ = raw_uci(shared_root, folder, inputs)
    constant = raw_inputs[:len(pool_inputs)].std(dim=0) == 0   # naval has constant columns
    assert torch.allclose(pool_inputs.mean(dim=0), torch.zeros(inputs, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(pool_inputs.std(dim=0)[~constant],
                          torch.ones(int((~constant).sum()), dtype=torch.float64), atol=1e-4)
    assert (pool_inputs[:, constant] == 0).all()
    assert abs(pool_targets.mean().item()) < 1e-4 and abs(pool_targets.std().item() - 1) < 1e-4


def test_target_scale_round_trip_gives_unnormalised_mse(shared_root):
    _, raw_targets = raw_uci(shared_root, "boston", 13)
    data = datasets.load_data({"class": "UCI_Boston"}, validation_proportion=0.2, data_root=shared_root)
    pool_raw = raw_targets[:455].double()
    assert torch.allclose(data.target_scale.double(), pool_raw.std(dim=0), rtol=1e-5)
    restored = data.test_targets.double() * data.target_scale.double() + pool_raw.mean(dim=0)
    assert torch.allclose(restored, raw_targets[455:].double(), atol=1e-4)
    # A prediction off by 2.0 in house-price units has unnormalised MSE 4.0.
    predictions = data.test_targets + 2.0 / data.target_scale
    unnormalised = datasets.unnormalised_mse(predictions, data.test_targets, data.target_scale)
    assert unnormalised.item() == pytest.approx(4.0, rel=1e-4)
    normalised = datasets.unnormalised_mse(predictions, data.test_targets, None)
    assert normalised.item() == pytest.approx(4.0 / data.target_scale.item() ** 2, rel=1e-4)


def test_validation_is_the_last_rounded_proportion_of_the_pool(shared_root):
    for proportion, validation in [(0.0, 0), (0.5, 346), (0.11272, 78)]:
        data = datasets.load_data({"class": "UCI_Energy"}, validation_proportion=proportion,
                                  data_root=shared_root)
        assert len(data.validation_inputs) == validation
        assert len(data.training_inputs) == 692 - validation


def test_subset_caps_training_rows_only(shared_root):
    data = datasets.load_data({"class": "UCI_Kin8nm", "subset": 100}, validation_proportion=0.2,
                              data_root=shared_root)
    assert len(data.training_inputs) == 100 and len(data.validation_inputs) == 1475
    assert len(data.test_inputs) == 819


def test_data_root_option_beats_environment_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERGRAD_DATA", str(tmp_path / "from_env"))
    assert datasets.resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert datasets.resolve_data_root() == tmp_path / "from_env"
    monkeypatch.delenv("HYPERGRAD_DATA")
    assert datasets.resolve_data_root() == Path("data")


def test_environment_variable_is_used_by_load_data(monkeypatch, shared_root):
    monkeypatch.setenv("HYPERGRAD_DATA", str(shared_root))
    data = datasets.load_data({"class": "UCI_Yacht"}, validation_proportion=0.2)
    assert len(data.training_inputs) == 222


# ------------------------------------------------------------------ errors

def test_unknown_class_is_one_line_naming_where():
    with pytest.raises(UserError) as error:
        datasets.load_data({"class": "UCI_Enrgy"}, validation_proportion=0.2, where="configs/x.yaml: dataset")
    assert_one_line(error, "configs/x.yaml: dataset.class", "UCI_Enrgy", "did you mean 'UCI_Energy'")


def test_unknown_option_is_one_line_naming_the_key():
    with pytest.raises(UserError) as error:
        datasets.load_data({"class": "UCI_Energy", "normalize_inputs": True}, validation_proportion=0.2,
                           where="configs/x.yaml: dataset")
    assert_one_line(error, "configs/x.yaml: dataset", "normalize_inputs", "normalise_inputs")


def test_bad_option_values_are_one_line_errors():
    with pytest.raises(UserError) as error:
        datasets.load_data({"class": "Digits", "subset": -3}, validation_proportion=0.2)
    assert_one_line(error, "dataset", "subset")
    with pytest.raises(UserError) as error:
        datasets.load_data({"class": "Digits"}, validation_proportion=1.5)
    assert_one_line(error, "validation_proportion")
    with pytest.raises(UserError) as error:
        datasets.load_data({"class": "Digits", "normalise_outputs": True}, validation_proportion=0.2)
    assert_one_line(error, "normalise_outputs")


def test_missing_uci_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(datasets.DataError) as error:
        datasets.load_data({"class": "UCI_Energy", "download": False}, validation_proportion=0.2,
                           data_root=tmp_path, where="configs/uci_energy.yaml: dataset")
    assert_one_line(error, "configs/uci_energy.yaml: dataset", "data.txt",
                    str(tmp_path / "uci" / "energy"), "HYPERGRAD_DATA")


def test_failed_download_is_one_line_and_fast(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        assert timeout == datasets.DOWNLOAD_TIMEOUT_S
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(datasets.DataError) as error:
        datasets.load_data({"class": "UCI_Yacht"}, validation_proportion=0.2, data_root=tmp_path)
    assert_one_line(error, "UCI_Yacht", "download failed", str(tmp_path / "uci" / "yacht"))
    assert not (tmp_path / "uci").exists()  # nothing half-written


def test_download_fetches_missing_files_atomically(tmp_path, monkeypatch, shared_root):
    """The download path end to end, with urlopen serving the shared files."""
    import io
    served = []

    def serve(url, timeout=None):
        served.append(url)
        name = "data.txt" if url.endswith("data.txt") else "permutation_indices.txt"
        return io.BytesIO((shared_root / "uci" / "yacht" / name).read_bytes())
    monkeypatch.setattr(datasets.urllib.request, "urlopen", serve)
    data = datasets.load_data({"class": "UCI_Yacht"}, validation_proportion=0.2, data_root=tmp_path)
    assert len(data.training_inputs) == 222
    assert served == [datasets.UCI_DATA_URL.format(upstream="yacht"),
                      datasets.UCI_PERMUTATION_URL.format(name="Yacht")]
    assert sorted(path.name for path in (tmp_path / "uci" / "yacht").iterdir()) == \
        ["data.txt", "permutation_indices.txt"]


def test_malformed_uci_file_is_one_line(tmp_path):
    folder = tmp_path / "uci" / "yacht"
    folder.mkdir(parents=True)
    (folder / "data.txt").write_text("1 2 3\n4 5 6\n")
    (folder / "permutation_indices.txt").write_text("0\n1\n")
    with pytest.raises(datasets.DataError) as error:
        datasets.load_data({"class": "UCI_Yacht"}, validation_proportion=0.2, data_root=tmp_path)
    assert_one_line(error, "UCI_Yacht", str(folder / "data.txt"), "308 rows")


def test_missing_torchvision_files_say_where_to_put_them(tmp_path):
    with pytest.raises(datasets.DataError) as error:
        datasets.load_data({"class": "FashionMNIST", "download": False}, validation_proportion=0.2,
                           data_root=tmp_path)
    assert_one_line(error, "dataset FashionMNIST: files not found under", str(tmp_path / "FashionMNIST"),
                    "HYPERGRAD_DATA")
    with pytest.raises(datasets.DataError) as error:
        datasets.load_data({"class": "CIFAR10", "download": False}, validation_proportion=0.1,
                           data_root=tmp_path)
    assert_one_line(error, str(tmp_path / "CIFAR10"))


def test_missing_penn_treebank_says_where_to_put_it(tmp_path):
    with pytest.raises(datasets.DataError) as error:
        datasets.load_data({"class": "PennTreebank", "download": False}, validation_proportion=0.1,
                           data_root=tmp_path)
    assert_one_line(error, "ptb.train.txt", str(tmp_path / "penn_treebank"))


# ------------------------------------------------------- scikit-learn sets

def test_digits_shapes_split_and_determinism():
    first = datasets.load_data({"class": "Digits", "normalise_inputs": True}, validation_proportion=0.2)
    second = datasets.load_data({"class": "Digits", "normalise_inputs": True}, validation_proportion=0.2)
    assert first.training_inputs.shape == (1150, 1, 8, 8)
    assert first.validation_inputs.shape == (288, 1, 8, 8) and first.test_inputs.shape == (359, 1, 8, 8)
    assert first.training_targets.dtype == torch.int64 and first.training_inputs.dtype == torch.float32
    assert (first.task, first.output_size, first.input_shape) == ("classification", 10, (1, 8, 8))
    for field in ("training_inputs", "training_targets", "validation_targets", "test_inputs"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    pool = torch.cat([first.training_inputs, first.validation_inputs])
    assert abs(pool.mean().item()) < 1e-5 and abs(pool.std().item() - 1) < 1e-4
    assert set(first.training_targets.tolist()) == set(range(10))


def test_digits_unnormalised_are_scaled_to_unit_interval():
    from sklearn.datasets import load_digits
    data = datasets.load_data({"class": "Digits"}, validation_proportion=0.2)
    assert 0 <= data.training_inputs.min() and data.training_inputs.max() <= 1
    order = np.random.RandomState(0).permutation(1797)
    expected = torch.tensor(load_digits().images[order[0]], dtype=torch.float32) / 16
    assert torch.equal(data.training_inputs[0, 0], expected)


def test_diabetes_is_regression_with_target_scale():
    data = datasets.load_data({"class": "Diabetes"}, validation_proportion=0.2)
    assert data.training_inputs.shape == (283, 10) and data.validation_inputs.shape == (71, 10)
    assert data.test_inputs.shape == (88, 10) and data.training_targets.shape == (283, 1)
    assert data.task == "regression" and data.target_scale.shape == (1,)
    assert 70 < data.target_scale.item() < 85  # diabetes progression std is about 77


def test_data_to_moves_every_tensor():
    data = datasets.load_data({"class": "Diabetes"}, validation_proportion=0.2).to("meta")
    for name in ("training_inputs", "training_targets", "validation_inputs", "validation_targets",
                 "test_inputs", "test_targets", "target_scale"):
        assert getattr(data, name).device.type == "meta", name
    assert data.name == "Diabetes"


# ------------------------------------------------ torchvision on-disk format

def write_idx(path, array, magic):
    """Write an MNIST-format (big-endian IDX) file, as torchvision extracts them."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion_mnist(tmp_path):
    """Six training and three test images in torchvision's raw FashionMNIST layout."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.RandomState(1)
    images = {"train": generator.randint(0, 256, (6, 28, 28)), "t10k": generator.randint(0, 256, (3, 28, 28))}
    labels = {"train": np.array([0, 1, 2, 3, 4, 5]), "t10k": np.array([7, 8, 9])}
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images[split], 0x803)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split], 0x801)
    return tmp_path, images, labels


def test_torchvision_files_become_whole_split_tensors(tiny_fashion_mnist):
    root, images, labels = tiny_fashion_mnist
    data = datasets.load_data({"class": "FashionMNIST", "normalise_inputs": False, "download": False},
                              validation_proportion=0.5, data_root=root)
    assert data.training_inputs.shape == (3, 1, 28, 28) and data.validation_inputs.shape == (3, 1, 28, 28)
    assert data.test_inputs.shape == (3, 1, 28, 28)
    assert torch.allclose(data.training_inputs[1, 0], torch.tensor(images["train"][1] / 255, dtype=torch.float32))
    assert data.validation_targets.tolist() == [3, 4, 5] and data.test_targets.tolist() == [7, 8, 9]
    assert data.training_targets.dtype == torch.int64 and data.output_size == 10


def test_torchvision_normalisation_is_per_channel_from_the_pool(tiny_fashion_mnist):
    root, _, _ = tiny_fashion_mnist
    data = datasets.load_data({"class": "FashionMNIST", "download": False}, validation_proportion=0.5,
                              data_root=root)
    pool = torch.cat([data.training_inputs, data.validation_inputs]).double()
    assert abs(pool.mean().item()) < 1e-5 and abs(pool.std().item() - 1) < 1e-4


# ------------------------------------------------------------ Penn Treebank

@pytest.fixture
def tiny_ptb(tmp_path):
    folder = tmp_path / "penn_treebank"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text(" the cat sat on the mat \n the dog <unk> \n")
    (folder / "ptb.valid.txt").write_text(" the cat ran \n")
    (folder / "ptb.test.txt").write_text(" a dog sat \n the end \n")
    return tmp_path


def test_penn_treebank_windows_vocabulary_and_shift(tiny_ptb):
    data = datasets.load_data({"class": "PennTreebank", "sequence_length": 3}, validation_proportion=0.25,
                              data_root=tiny_ptb)
    vocabulary = ["the", "cat", "sat", "on", "mat", "<eos>", "dog", "<unk>"]
    assert data.task == "language_model" and data.output_size == len(vocabulary)
    assert data.input_shape == (3,) and data.training_inputs.dtype == torch.int64
    words = lambda ids: [vocabulary[i] for i in ids.reshape(-1).tolist()]  # noqa: E731
    # pool = train + valid = 15 tokens -> 4 windows of 3 (+1 for the shifted target); last 1 is validation
    assert words(data.training_inputs) == "the cat sat on the mat <eos> the dog".split()
    assert words(data.training_targets) == "cat sat on the mat <eos> the dog <unk>".split()
    assert words(data.validation_inputs) == "<unk> <eos> the".split()
    assert words(data.validation_targets) == "<eos> the cat".split()
    assert words(data.test_inputs) == "<unk> dog sat <eos> the <unk>".split()
    assert words(data.test_targets) == "dog sat <eos> the <unk> <eos>".split()


def test_penn_treebank_rejects_bad_sequence_length(tiny_ptb):
    with pytest.raises(UserError) as error:
        datasets.load_data({"class": "PennTreebank", "sequence_length": 0}, validation_proportion=0.2,
                           data_root=tiny_ptb)
    assert_one_line(error, "sequence_length")
