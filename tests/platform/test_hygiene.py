"""Personal information out of the pretraining data: every planted item of every kind replaced,
every look-alike kept, the counts exact, in the scrubber alone and through prepare_data on Ray Data
(manifest, MLflow, the masked sample), and documents from blocked domains dropped."""

from __future__ import annotations

import ipaddress
import json
import random
import string

import numpy as np

from corral.data.hygiene import PLACEHOLDER, blocked, iban_ok, luhn_ok, mask, scrub_pii


def luhn_digit(body: str) -> str:
    """The check digit that makes body + digit pass Luhn (computed independently of `luhn_ok`)."""
    for d in "0123456789":
        digits = [int(c) for c in body + d][::-1]
        total = sum(x if i % 2 == 0 else (2 * x if 2 * x < 10 else 2 * x - 9) for i, x in enumerate(digits))
        if total % 10 == 0:
            return d
    raise AssertionError("unreachable")


def iban(rng: random.Random, country: str, length: int) -> str:
    """A valid IBAN: check digits 98 - (BBAN + country + 00 as a number mod 97)."""
    bban = "".join(rng.choice(string.digits) for _ in range(length - 4))
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - number % 97:02d}{bban}"


def grouped(s: str, sep: str = " ") -> str:
    return sep.join(s[i:i + 4] for i in range(0, len(s), 4))


def planted(rng: random.Random) -> dict[str, list[str]]:
    """One random item of every kind, in one of its written forms."""
    user = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
    card = "4" + "".join(rng.choice(string.digits) for _ in range(14))
    card += luhn_digit(card)
    amex = "37" + "".join(rng.choice(string.digits) for _ in range(12))
    amex += luhn_digit(amex)
    area, ex, line = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    return {
        "email": [rng.choice([f"{user}@example.com", f"{user}.x+tag@mail.example.co.uk"])],
        "iban": [rng.choice([iban(rng, "DE", 22), grouped(iban(rng, "GB", 22))])],
        "card": [rng.choice([grouped(card), grouped(card, "-"), card]), amex],
        "ipv6": [str(ipaddress.IPv6Address(rng.getrandbits(128)))],
        "ipv4": [str(ipaddress.IPv4Address(rng.randint(1 << 24, (223 << 24) - 1)))],
        "phone": [rng.choice([f"+1 ({area}) {ex}-{line:04d}", f"+44 20 {ex}{line % 10} {line:04d}",
                              f"({area}) {ex}-{line:04d}", f"{area}-{ex}-{line:04d}", f"{area}.{ex}.{line:04d}"])],
    }


def look_alikes(rng: random.Random) -> list[str]:
    """Text that resembles personal information but is not, and must survive untouched."""
    bad_card = "5" + "".join(rng.choice(string.digits) for _ in range(14))
    bad_card += str((int(luhn_digit(bad_card)) + rng.randint(1, 9)) % 10)  # any digit but the right one
    good = iban(rng, "FR", 27)
    at = rng.randrange(4, len(good))  # one digit of the account changed: mod 97 catches every such slip
    bad_iban = good[:at] + str((int(good[at]) + rng.randint(1, 9)) % 10) + good[at + 1:]
    return [f"version {rng.randint(0, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 9)}",
            f"v{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}",
            f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/{rng.randint(1900, 2099)}",
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
            grouped(bad_card), bad_iban, f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.1.1",
            f"${rng.randint(1, 9)},{rng.randint(100, 999)}.99", f"pages {rng.randint(1, 99)}-{rng.randint(100, 199)}"]


def document(rng: random.Random) -> tuple[str, dict[str, list[str]], list[str]]:
    items, keep = planted(rng), look_alikes(rng)
    pieces = [f"{kind} here: {v}." for kind, vs in items.items() for v in vs] + [f"not one: {k}." for k in keep]
    rng.shuffle(pieces)
    return " ".join(pieces), items, keep


def test_checksums_by_hand():
    assert luhn_ok("4111111111111111") and luhn_ok("378282246310005") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82 WEST 1234 5698 7654 33") and not iban_ok("DE89")
    assert mask("jane@example.com") == "j**************m"
    assert blocked("https://www.people-search.example/p/1", ["people-search.example"])
    assert not blocked("https://notpeople-search.example/", ["people-search.example"])
    assert not blocked("", ["people-search.example"]) and not blocked("https://a.example/", [])


def test_every_planted_item_replaced_no_look_alike_touched_counts_exact():
    rng = random.Random(0)
    for _ in range(300):
        text, items, keep = document(rng)
        scrubbed, counts, found = scrub_pii(text)
        for kind, values in items.items():
            for v in values:
                assert v not in scrubbed, (kind, v, scrubbed)
            assert scrubbed.count(PLACEHOLDER[kind]) == counts[kind] == len(values), (kind, text, scrubbed)
        for k in keep:
            assert k in scrubbed, (k, text, scrubbed)
        assert sorted(v for _, v in found) == sorted(v for vs in items.values() for v in vs)


def corpus_with_pii(root, n: int, seed: int):
    """JSONL documents with planted personal information, a third of them from a blocked domain."""
    rng = random.Random(seed)
    root.mkdir()
    docs = []
    with open(root / "docs.jsonl", "w") as f:
        for i in range(n):
            text, items, keep = document(rng)
            text = f"Record {i} of the register. {text} " + "The rest is ordinary prose of the register. " * 20
            url = f"https://{'www.people-search.example' if i % 3 == 0 else 'news.example'}/page/{i}"
            f.write(json.dumps({"text": text, "url": url}) + "\n")
            docs.append((url, items, keep))
    return root, docs


def test_prepare_data_scrubs_counts_and_blocks(ray_cluster, mlflow_server, tokenizer, tmp_path):
    from corral import tracking
    from corral.data.pretraining import PII_SAMPLES, PII_SAMPLES_FILE, read_manifest
    from pipelines.steps import prepare_data

    src, docs = corpus_with_pii(tmp_path / "corpus", 60, seed=1)
    run_id = tracking.start_run("test-hygiene", "prepare_data")
    out = prepare_data.run({"inputs": [str(src)], "seq_len": 64, "val_fraction": 0.0, "scrub_pii": True,
                            "blocked_domains": ["people-search.example"], "tokenizer": str(tokenizer.path),
                            "output_dir": str(tmp_path / "data")}, {"run_id": run_id})
    tracking.flush()
    manifest = read_manifest(out["data"])
    kept = [d for d in docs if "people-search" not in d[0]]
    expected = {kind: sum(len(items[kind]) for _, items, _ in kept) for kind in PLACEHOLDER}
    assert manifest["pii"] == expected
    assert manifest["documents"] == {"documents": len(kept), "skipped_blocked_domain": len(docs) - len(kept)}
    for kind, n in expected.items():
        assert tracking.metric_history(run_id, f"pii_{kind}") == [(0, float(n))]
    assert tracking.metric_history(run_id, "skipped_blocked_domain") == [(0, float(len(docs) - len(kept)))]

    # the tokens hold placeholders and look-alikes, none of the planted items
    blocks = np.concatenate([np.load(tmp_path / "data" / s["path"]) for s in manifest["splits"]["train"]["shards"]])
    text = tokenizer.decode(blocks.ravel().tolist())
    assert text.count("[EMAIL]") >= expected["email"] - 2  # the dropped tail of a batch may cut a few
    for _, items, _ in docs:
        for values in items.values():
            assert not any(v in text for v in values)
    assert "Record 1 of the register" in text and "Record 0 of the register" not in text  # 0: blocked
    samples = [json.loads(line) for line in (tmp_path / "data" / PII_SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == min(PII_SAMPLES, sum(expected.values())) and {s["kind"] for s in samples} == set(PLACEHOLDER)
    planted_values = {v for _, items, _ in kept for vs in items.values() for v in vs}
    assert all(s["masked"] not in planted_values and "*" in s["masked"] for s in samples)
    assert PII_SAMPLES_FILE in [a.path for a in tracking.client().list_artifacts(run_id)]
