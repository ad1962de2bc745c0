"""The codec: exact round trips, identical tables on both sides, code lengths near the prior's bits, clear refusals."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from codec import Codec, CodecError, integer_table
from codec.codec import FILE_HEADER
from common.data import ImageTransform, image_loader, to_float
from common.images import to_pil
from conftest import python_m
from prior import bits, load_prior, prior_loss
from tokenizer import VQVAE


@pytest.fixture(scope="module")
def models(chain):
    prior, info = load_prior(str(chain["prior"]))
    return VQVAE.from_pretrained(chain["tokenizer"]).eval(), prior, info


@pytest.fixture(scope="module")
def test_images(fashion):
    batch = next(iter(image_loader(fashion.test.select(range(300)), ImageTransform(channels=1), 300, shuffle=False)))
    return batch["pixel_values"], batch["labels"]


def test_integer_tables_sum_exactly_and_keep_every_code():
    logits = torch.tensor([[0.0, 0.0, 0.0], [50.0, -50.0, 0.0], [1e-9, 0.0, -1e-9]])
    freqs = integer_table(logits)
    assert (freqs.sum(1) == 1 << 16).all() and (freqs >= 1).all()
    assert freqs[1, 1] == 1 and freqs[1, 0] > 65000


@pytest.mark.parametrize("group", [1, 7, 64])
def test_archive_round_trip_is_exact_with_and_without_condition(models, test_images, group):
    tokenizer, prior, info = models
    codec = Codec(tokenizer, prior, info)
    images, labels = test_images
    images, labels = images[:60], labels[:60].tolist()
    codes = codec.encode_images(images)
    conditions = [lb if i % 2 else -1 for i, lb in enumerate(labels)]  # half with their class, half the null class
    data = codec.compress_archive(codes, conditions, tuple(info.grid), names=[f"{i}.png" for i in range(60)], group=group)
    decoded, conds, names, grid = codec.decompress_archive(data)
    assert np.array_equal(decoded, codes) and conds == conditions and names[3] == "3.png" and grid == tuple(info.grid)


def test_single_file_decodes_to_the_tokenizers_reconstruction(models, test_images):
    tokenizer, prior, info = models
    codec = Codec(tokenizer, prior, info)
    images, labels = test_images
    for i in range(6):
        data = codec.compress(images[i], label=int(labels[i]) if i % 2 else -1)
        with torch.no_grad():
            expected = tokenizer.decode(tokenizer.encode(images[i : i + 1]))[0]
        assert torch.equal(codec.decompress(data), expected)


def test_near_tie_tables_still_round_trip(models, test_images):
    """A prior whose distributions are almost uniform puts many table entries next to a rounding boundary."""
    tokenizer, prior, info = models
    flat = copy.deepcopy(prior)
    with torch.no_grad():
        flat.get_output_embeddings().weight.mul_(1e-7)
    codec = Codec(tokenizer, flat, info)
    images, labels = test_images
    codes = codec.encode_images(images[:32])
    with torch.no_grad():
        ids = info.layout.sequences(torch.as_tensor(codes[:4, :10]), labels[:4])
        logits = flat(input_ids=ids).logits[..., : info.num_codes].double()
    assert (logits.amax(-1) - logits.amin(-1)).max() < 1e-4  # near-ties indeed
    for group in (1, 5, 32):
        data = codec.compress_archive(codes, labels[:32].tolist(), tuple(info.grid), group=group)
        assert np.array_equal(codec.decompress_archive(data)[0], codes)


def test_code_length_is_the_priors_bits_plus_the_header(models, test_images):
    tokenizer, prior, info = models
    codec = Codec(tokenizer, prior, info)
    images, labels = test_images
    codes = codec.encode_images(images)
    with torch.no_grad():
        nats = prior_loss(prior, torch.as_tensor(codes), labels, info.layout, reduction="none")
    bits_per_image = float(bits(nats).mean()) * info.seq_len
    data = codec.compress_archive(codes, labels.tolist(), tuple(info.grid), group=100)
    per_image = 8 * len(data) / len(codes)
    expected = bits_per_image + 8 * 4  # + each image's condition and CRC
    assert abs(per_image - expected) / expected < 0.03, (per_image, expected)
    # One file per image: the 13-byte header, then the stream in 32-bit words.
    sizes = [len(codec.compress_codes(c, int(lb), tuple(info.grid))) for c, lb in zip(codes[:40], labels[:40])]
    payload_bits = 8 * (np.mean(sizes) - FILE_HEADER.size)
    assert bits_per_image <= payload_bits + 4 < bits_per_image + 64 + 4, (payload_bits, bits_per_image)


def test_without_a_prior_codes_take_log2_k_bits(models, test_images):
    tokenizer, _, info = models
    codec = Codec(tokenizer)
    images, _ = test_images
    data = codec.compress(images[0])
    assert len(data) == FILE_HEADER.size + -(-info.seq_len * codec.bits_per_code // 8)
    assert torch.equal(codec.decompress(data), tokenizer.decode(tokenizer.encode(images[:1]))[0])
    with pytest.raises(CodecError, match="coded with no prior"):
        Codec(tokenizer, *models[1:]).decompress(data)


def test_other_models_truncated_and_foreign_files_are_refused(models, test_images):
    tokenizer, prior, info = models
    codec = Codec(tokenizer, prior, info)
    images, labels = test_images
    data = codec.compress(images[0], int(labels[0]))
    other = copy.deepcopy(prior)
    with torch.no_grad():
        other.get_output_embeddings().weight[0, 0] += 1e-3
    with pytest.raises(CodecError, match="another tokenizer/prior pair"):
        Codec(tokenizer, other, info).decompress(data)
    with pytest.raises(CodecError, match="truncated|damaged"):
        codec.decompress(data[:8])
    with pytest.raises(CodecError, match="damaged|CRC"):
        codec.decompress(data[:-4])
    with pytest.raises(CodecError, match="not a vqgpt codec file"):
        codec.decompress(b"\x89PNG\r\n\x1a\n" + bytes(40))
    archive = codec.compress_archive(codec.encode_images(images[:10]), labels[:10].tolist(), tuple(info.grid))
    with pytest.raises(CodecError, match="truncated"):
        codec.decompress_archive(archive[: len(archive) // 2])


def test_cli_codes_a_class_folder_with_its_labels_and_names(chain, models, test_images, tmp_path):
    """python -m codec on <class>/ folders: each image coded with its folder's class (the null class where
    the folder is no class of the prior), named by its path; decoded back into the same tree."""
    tokenizer, prior, info = models
    images, labels = test_images
    root, files, conditions = tmp_path / "in", [], []
    for i in range(12):
        folder = "unsorted" if i % 4 == 0 else info.class_names[int(labels[i])]  # no class of the prior: the null class
        (root / folder).mkdir(parents=True, exist_ok=True)
        to_pil(images[i : i + 1])[0].save(root / folder / f"{i:02d}.png")
        files.append(f"{folder}/{i:02d}.png")
        conditions.append(info.class_names.index(folder) if folder in info.class_names else -1)
    assert -1 in conditions and len(set(conditions)) > 3
    order = sorted(range(12), key=files.__getitem__)
    proc = python_m("codec", "compress", "--prior", str(chain["prior"]), "--input", str(root), "--output", str(tmp_path / "a.vqga"))
    assert "Generating train split" not in proc.stderr and "Downloading" not in proc.stderr, "a local folder is read quietly"
    codec = Codec(tokenizer, prior, info)
    read = torch.stack([to_float(ImageTransform(1).pixels({"path": str(root / files[i]), "bytes": None})) for i in order])
    codes = codec.encode_images(read)
    expected = codec.compress_archive(codes, [conditions[i] for i in order], tuple(info.grid), names=[files[i] for i in order])
    assert (tmp_path / "a.vqga").read_bytes() == expected

    python_m("codec", "decompress", "--prior", str(chain["prior"]), "--input", str(tmp_path / "a.vqga"), "--output", str(tmp_path / "out"))  # fmt: skip
    for k, i in enumerate(order):
        recon = to_pil(codec.decode_codes(codes[k][None], tuple(info.grid)))[0]
        assert np.array_equal(np.array(PILImage.open(tmp_path / "out" / files[i])), np.array(recon))


def test_cli_refuses_colour_for_a_grayscale_tokenizer_unless_asked_to_convert(chain, models, test_images, tmp_path):
    """The colour rule of every command: an RGB image into a grayscale tokenizer is one line naming it;
    --image-channels 1 converts it, and then it codes exactly as its grayscale version."""
    tokenizer, prior, info = models
    gray = to_pil(test_images[0][:1])[0]
    gray.convert("RGB").save(tmp_path / "rgb.png")
    gray.save(tmp_path / "gray.png")
    proc = python_m("codec", "compress", "--prior", str(chain["prior"]), "--input", str(tmp_path / "rgb.png"),
                    "--output", str(tmp_path / "rgb.vqg"), check=False)  # fmt: skip
    assert proc.returncode == 1 and not (tmp_path / "rgb.vqg").exists()
    assert proc.stderr.strip().splitlines()[-1] == (f"error: image {tmp_path / 'rgb.png'} is colour (RGB) but the tokenizer takes "
                                                    "grayscale (1 channel); pass --image-channels 1 to convert every image")  # fmt: skip
    for name in ("rgb", "gray"):
        python_m("codec", "compress", "--prior", str(chain["prior"]), "--input", str(tmp_path / f"{name}.png"),
                 "--output", str(tmp_path / f"{name}.vqg"), "--image-channels", "1")  # fmt: skip
    assert (tmp_path / "rgb.vqg").read_bytes() == (tmp_path / "gray.vqg").read_bytes()
