#!/usr/bin/env python3
"""Independent generator of the test vectors in docs/PROTOCOL.md ("Test vectors").

Written from docs/PROTOCOL.md alone, with the `cryptography` package (pip install cryptography),
without any fedmq code: tests/conformance.rs checks that the Rust implementation verifies, opens
and unwraps what this script produces. CI does not run it; its output is pasted into the doc,
and it writes tests/vectors/sealed-two-chunks.bin.

    python3 tests/vectors/gen_vectors.py   # prints the doc's blocks; writes sealed-two-chunks.bin
"""

import hashlib
import hmac
import json
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

P = 2**255 - 19
HERE = os.path.dirname(os.path.abspath(__file__))


def raw_public(key):
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def hkdf32(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


# --- identities -------------------------------------------------------------------------------


def ed25519_public(seed: bytes) -> bytes:
    return raw_public(Ed25519PrivateKey.from_private_bytes(seed).public_key())


def x25519_scalar(seed: bytes) -> bytes:
    """The X25519 secret of an Ed25519 seed: SHA-512(seed)[0..32] (X25519 clamps it)."""
    return hashlib.sha512(seed).digest()[:32]


def montgomery(ed_public: bytes) -> bytes:
    """An Ed25519 public key in Montgomery form: u = (1 + y) / (1 - y) mod p."""
    y = int.from_bytes(ed_public, "little") & ((1 << 255) - 1)
    u = (1 + y) * pow((1 - y) % P, P - 2, P) % P
    return u.to_bytes(32, "little")


# --- signed messages --------------------------------------------------------------------------


def sign(seed: bytes, json_bytes: bytes) -> bytes:
    sig = Ed25519PrivateKey.from_private_bytes(seed).sign(json_bytes)
    return json_bytes + b"\n" + sig.hex().encode()


# --- sealed blobs -----------------------------------------------------------------------------


def seal(mode: int, secret: bytes, object_key: str, plaintext: bytes, salt: bytes, chunk_log2=20):
    header = b"fedmqSB1" + bytes([mode, chunk_log2]) + bytes(6)
    header += struct.pack("<Q", len(plaintext)) + salt
    assert len(header) == 56
    key = hkdf32(secret, salt, b"fedmq/v1 blob" + bytes([mode]) + object_key.encode())
    aead = AESGCM(key)
    chunk = 1 << chunk_log2
    n = max(1, -(-len(plaintext) // chunk))
    out = bytearray(header)
    for i in range(n):
        last = 1 if i + 1 == n else 0
        nonce = bytes([last, 0, 0, 0]) + struct.pack(">Q", i)
        out += aead.encrypt(nonce, plaintext[i * chunk : (i + 1) * chunk], header)
    assert len(out) == 56 + len(plaintext) + 16 * n
    return bytes(out), key


def wrap(content_key: bytes, reader_ed_public: bytes, object_key: str, ephemeral: bytes):
    r = montgomery(reader_ed_public)
    e = X25519PrivateKey.from_private_bytes(ephemeral)
    e_pub = raw_public(e.public_key())
    shared = e.exchange(X25519PublicKey.from_public_bytes(r))
    assert shared != bytes(32)
    kek = hkdf32(shared, e_pub + r, b"fedmq/v1 key wrap" + object_key.encode())
    c = ChaCha20Poly1305(kek).encrypt(bytes(12), content_key, object_key.encode())
    wrapped = e_pub + c
    assert len(wrapped) == 80
    return wrapped, {"R": r, "E": e_pub, "shared": shared, "kek": kek}


# --- safetensors ------------------------------------------------------------------------------


def safetensors(tensors):
    """tensors: [(name, shape, [f32 values])]; written as fedmq writes them (names sorted)."""
    header, data, off = {}, b"", 0
    for name, shape, values in sorted(tensors):
        b = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
        data += b
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def model_header_len(specs):
    """Length of the safetensors blob of a model with these (name, shape) tensors."""
    n = 0
    header, off = {}, 0
    for name, shape in sorted(specs):
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + size]}
        off += size
    h = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(h) + (-len(h) % 8) + off


def model_specs(kind, c, h, w, classes=10):
    d = c * h * w
    if kind == "lr":
        return [("linear.weight", [classes, d]), ("linear.bias", [classes])]
    if kind == "mlp":
        return [
            ("fc1.weight", [200, d]), ("fc1.bias", [200]),
            ("fc2.weight", [200, 200]), ("fc2.bias", [200]),
            ("fc3.weight", [classes, 200]), ("fc3.bias", [classes]),
        ]
    flat = 64 * (h // 4) * (w // 4)
    return [
        ("conv1.weight", [32, c, 5, 5]), ("conv1.bias", [32]),
        ("conv2.weight", [64, 32, 5, 5]), ("conv2.bias", [64]),
        ("fc1.weight", [512, flat]), ("fc1.bias", [512]),
        ("fc2.weight", [classes, 512]), ("fc2.bias", [classes]),
    ]


def field(label, value):
    """One `label: value` line of a doc block; hex longer than 64 digits continues on lines of 64."""
    if isinstance(value, bytes):
        value = value.hex()
    value = str(value)
    if len(value) <= 64 or not all(c in "0123456789abcdef" for c in value):
        return f"{label}: {value}"
    return f"{label}:\n" + "\n".join(value[i : i + 64] for i in range(0, len(value), 64))


def block(fields):
    return "```text\n" + "\n".join(field(k, v) for k, v in fields) + "\n```"


def main():
    client_seed = bytes(range(0x00, 0x20))
    server_seed = bytes(range(0x20, 0x40))
    client_pub = ed25519_public(client_seed)
    server_pub = ed25519_public(server_seed)
    for seed, pub in [(client_seed, client_pub), (server_seed, server_pub)]:
        # The Montgomery form of the public key is the X25519 public key of the derived scalar.
        assert montgomery(pub) == raw_public(
            X25519PrivateKey.from_private_bytes(x25519_scalar(seed)).public_key()
        )
    print("#### Identities\n")
    print(block([
        ("client-3 seed", client_seed),
        ("client-3 public key", client_pub),
        ("client-3 x25519 secret", x25519_scalar(client_seed)),
        ("client-3 x25519 public", montgomery(client_pub)),
        ("server seed", server_seed),
        ("server public key", server_pub),
        ("server x25519 secret", x25519_scalar(server_seed)),
        ("server x25519 public", montgomery(server_pub)),
    ]))

    # Vector B: client-3's sealed update for round 4, wrapped to the server.
    key_b = "fedmq/local/r000004/updates/client-3"
    plain_b = safetensors([("fc.weight", [1, 2], [1.0, -2.0]), ("fc.bias", [1], [0.5])])
    ck_b = bytes(range(0x40, 0x60))
    salt_b = bytes(range(0x60, 0x80))
    eph_b = bytes(range(0x80, 0xA0))
    sealed_b, aead_b = seal(1, ck_b, key_b, plain_b, salt_b)
    wrapped_b, w = wrap(ck_b, server_pub, key_b, eph_b)

    # Vector A: the update notice for vector B, signed by client-3.
    env = {
        "v": 1, "run": "local", "round": 4, "id": "5f0c6e7a9b1d2e3f", "from": "client-3",
        "ts_ms": 1763712010000,
        "body": {
            "type": "update",
            "update": {
                "key": key_b, "len": len(sealed_b),
                "sha256": hashlib.sha256(sealed_b).hexdigest(), "wrapped_key": wrapped_b.hex(),
            },
            "num_samples": 5923,
            "metrics": {"train_loss": 0.213, "train_seconds": 8.4},
        },
    }
    json_a = json.dumps(env, separators=(",", ":")).encode()
    signed_a = sign(client_seed, json_a)
    print("\n#### A. A signed message\n")
    print("```text\n" + signed_a.decode() + "\n```")

    print("\n#### B. A sealed update, wrapped to the server\n")
    print(block([
        ("object key", key_b),
        ("plaintext", plain_b),
        ("content key", ck_b),
        ("salt", salt_b),
        ("blob aead key", aead_b),
        ("ephemeral secret", eph_b),
        ("ephemeral public", w["E"]),
        ("reader public", w["R"]),
        ("shared secret", w["shared"]),
        ("kek", w["kek"]),
        ("wrapped key", wrapped_b),
        ("sealed length", len(sealed_b)),
        ("sealed sha256", hashlib.sha256(sealed_b).hexdigest()),
        ("sealed", sealed_b),
    ]))

    # Vector C: a server checkpoint-style blob sealed with the server's own key (mode 2).
    key_c = "fedmq/local/checkpoint/r000004"
    plain_c = b'{"round":4}'
    salt_c = bytes(range(0xA0, 0xC0))
    sealed_c, aead_c = seal(2, server_seed, key_c, plain_c, salt_c)
    print("\n#### C. A blob sealed with the server's own key\n")
    print(block([
        ("object key", key_c),
        ("plaintext", plain_c),
        ("salt", salt_c),
        ("blob aead key", aead_c),
        ("sealed", sealed_c),
    ]))

    # Vector D: two chunks of 2^16 bytes, wrapped to client-3 (the sealed bytes go to a file).
    key_d = "fedmq/local/r000004/global"
    plain_d = bytes((i * 31) % 251 for i in range(65546))
    ck_d = bytes(range(0xC0, 0xE0))
    salt_d = bytes(range(0xE0, 0x100))
    eph_d = bytes([0x42] * 32)
    sealed_d, _ = seal(1, ck_d, key_d, plain_d, salt_d, chunk_log2=16)
    wrapped_d, _ = wrap(ck_d, client_pub, key_d, eph_d)
    with open(os.path.join(HERE, "sealed-two-chunks.bin"), "wb") as f:
        f.write(sealed_d)
    print("\n#### D. Two chunks, wrapped to a client\n")
    print(block([
        ("object key", key_d),
        ("plaintext length", len(plain_d)),
        ("content key", ck_d),
        ("salt", salt_d),
        ("ephemeral secret", eph_d),
        ("wrapped key", wrapped_d),
        ("header", sealed_d[:56]),
        ("chunk 0 tag", sealed_d[56 + 65536 : 56 + 65536 + 16]),
        ("chunk 1 tag", sealed_d[-16:]),
        ("sealed length", len(sealed_d)),
        ("sealed sha256", hashlib.sha256(sealed_d).hexdigest()),
    ]))

    store_secret, participant = "s3cret", "client-1"
    label = b"fedmq store credential v1\x00"
    print("\n#### E. A participant's store credential\n")
    print(block([
        ("store secret", store_secret),
        ("access key", participant),
        ("secret", hmac.new(store_secret.encode(), label + participant.encode(), hashlib.sha256).hexdigest()[:40]),
    ]))

    print("\n| model | parameters, MNIST | blob bytes, MNIST | parameters, CIFAR-10 | blob bytes, CIFAR-10 |")
    print("|---|---|---|---|---|")
    for kind in ["lr", "mlp", "cnn"]:
        row = [f"`{kind}`"]
        for c, h, w in [(1, 28, 28), (3, 32, 32)]:
            specs = model_specs(kind, c, h, w)
            params = 0
            for _, shape in specs:
                n = 1
                for d in shape:
                    n *= d
                params += n
            row += [str(params), str(model_header_len(specs))]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
