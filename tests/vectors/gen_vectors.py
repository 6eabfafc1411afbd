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
from fractions import Fraction

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
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


# --- secure aggregation -----------------------------------------------------------------------

FP = 2**61 - 1  # the field of Shamir shares


def x25519_public(secret: bytes) -> bytes:
    return raw_public(X25519PrivateKey.from_private_bytes(secret).public_key())


def agree(secret: bytes, their_public: bytes, ctx: bytes):
    """The page's agree(a, B, ctx); also returns the X25519 result."""
    own = x25519_public(secret)
    shared = X25519PrivateKey.from_private_bytes(secret).exchange(
        X25519PublicKey.from_public_bytes(their_public)
    )
    assert shared != bytes(32)
    salt = min(own, their_public) + max(own, their_public)
    return hkdf32(shared, salt, b"fedmq/v1 secagg pairwise" + ctx), shared


def mask_words(seed: bytes, n: int):
    """The first n u32 words (little-endian) of the AES-256-CTR keystream (NIST SP 800-38A) of
    seed as the key, the initial counter block all zero, incremented as a 128-bit big-endian
    integer."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return list(struct.unpack("<%dI" % n, enc.update(bytes(4 * n))))


LQ = 2**32 - 5  # LightSecAgg's field


def field_mask(seed: bytes, n: int):
    """LightSecAgg's mask: the words of mask_words below q, in order, the first n of them."""
    out, k = [], n
    while len(out) < n:
        k *= 2
        out = [w for w in mask_words(seed, k) if w < LQ][:n]
    return out


def lagrange_at(xs, at):
    """c_j with f(at) = sum c_j f(xs_j) for polynomials of degree below len(xs), mod q."""
    cs = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for l, xl in enumerate(xs):
            if l != j:
                num = num * (at - xl) % LQ
                den = den * (xj - xl) % LQ
        cs.append(num * pow(den, LQ - 2, LQ) % LQ)
    return cs


def lsa_encode(mask, noise, n, u, t):
    """The n coded shares of mask: U − T data pieces (zero-padded) and T noise pieces at
    x = n+1..n+U, evaluated at x = 1..n."""
    ell = -(-len(mask) // (u - t))
    pieces = [mask[k * ell:(k + 1) * ell] for k in range(u - t)]
    pieces = [p + [0] * (ell - len(p)) for p in pieces] + noise
    pts = [n + k for k in range(1, u + 1)]
    shares = []
    for j in range(1, n + 1):
        c = lagrange_at(pts, j)
        shares.append([sum(ck * pc[r] for ck, pc in zip(c, pieces)) % LQ for r in range(ell)])
    return shares


def coefficients(label: str, t: int):
    """Fixed, reproducible polynomial coefficients a_1..a_{t-1} (eight limbs each): SHA-256 of a
    label, as u64 little-endian, mod p (real clients draw them at random)."""
    return [
        [int.from_bytes(hashlib.sha256(f"{label} a{k} limb {l}".encode()).digest()[:8], "little") % FP
         for l in range(8)]
        for k in range(1, t)
    ]


def shamir_share(secret: bytes, coeffs, x: int) -> bytes:
    """The 66-byte share at x: f_l(x) for the eight u32 limbs of secret."""
    limbs = struct.unpack("<8I", secret)
    ys = []
    for l, s in enumerate(limbs):
        poly = [s] + [a[l] for a in coeffs]
        ys.append(sum(c * pow(x, k, FP) for k, c in enumerate(poly)) % FP)
    return struct.pack("<H8Q", x, *ys)


def shamir_recover(shares):
    """Lagrange interpolation at 0; None when a limb is not below 2^32."""
    pts = [struct.unpack("<H8Q", s) for s in shares]
    out = b""
    for l in range(8):
        acc = 0
        for i, pi in enumerate(pts):
            num, den = 1, 1
            for j, pj in enumerate(pts):
                if j != i:
                    num = num * pj[0] % FP
                    den = den * (pj[0] - pi[0]) % FP
            acc = (acc + pi[1 + l] * num * pow(den, FP - 2, FP)) % FP
        if acc >= 2**32:
            return None
        out += struct.pack("<I", acc)
    return out


def f32(x: float) -> float:
    """x rounded to the nearest f32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_str(x: float) -> str:
    """The shortest decimal that reads back as the f32 x."""
    for p in range(1, 10):
        s = "%.*g" % (p, x)
        if f32(float(s)) == x:
            return s
    raise AssertionError(x)


def round_half_away(r: Fraction) -> int:
    n = int(abs(r) + Fraction(1, 2))  # floor(|r| + 1/2)
    return n if r >= 0 else -n


def quantize(x: float, c: float, bits: int) -> int:
    """The page's q = round((v + c)·L / 2c): v an f32 (NaN counts as 0), f64 arithmetic, half away
    from zero."""
    L = 2**bits - 1
    v = 0.0 if x != x else min(max(x, -c), c)
    t = (v + c) * L / (2 * c)  # f64
    q = round_half_away(Fraction(t))
    # The exact rational gives the same q unless v + c itself rounds in f64 (tiny |v|).
    if abs(v) > 2**-40 or v == 0:
        assert q == round_half_away((Fraction(v) + Fraction(c)) * L / (2 * Fraction(c))), x
    assert 0 <= q <= L
    return q


def dequantize_sum(s: int, n: int, c: float, bits: int) -> float:
    """The page's S·2c/L − n·c in f64."""
    L = 2**bits - 1
    return s * 2 * c / L - n * c


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


    # --- secure aggregation: run `local`, round 4 -------------------------------------------
    context = b"local|4"
    mask_sk = {
        "client-1": bytes(range(0x10, 0x30)),
        "client-2": bytes(range(0x30, 0x50)),
        "client-3": bytes(range(0x50, 0x70)),
    }
    cipher_sk = {
        "client-1": bytes(range(0x70, 0x90)),
        "client-2": bytes(range(0x90, 0xB0)),
        "client-3": bytes(range(0xB0, 0xD0)),
    }
    self_seed = {
        "client-1": bytes(range(0xD0, 0xF0)),
        "client-2": bytes(range(0xFF, 0xDF, -1)),
        "client-3": bytes((7 * i + 3) % 256 for i in range(32)),
    }
    mask_pk = {c: x25519_public(k) for c, k in mask_sk.items()}
    cipher_pk = {c: x25519_public(k) for c, k in cipher_sk.items()}
    clients = sorted(mask_sk)

    # Vector F: the pairwise mask seed of client-1 and client-2, and its first mask words.
    mask_ctx = b"mask|" + context
    seed_12, shared_12 = agree(mask_sk["client-1"], mask_pk["client-2"], mask_ctx)
    seed_21, shared_21 = agree(mask_sk["client-2"], mask_pk["client-1"], mask_ctx)
    assert (seed_12, shared_12) == (seed_21, shared_21)
    # FIPS-197 known answer: AES-256 of the zero block under the zero key.
    assert bytes.fromhex("dc95c078a2408989ad48a21492842087") == struct.pack("<4I", *mask_words(bytes(32), 4))
    print("\n#### F. A pairwise mask seed\n")
    print(block([
        ("client-1 mask secret", mask_sk["client-1"]),
        ("client-1 mask public", mask_pk["client-1"]),
        ("client-2 mask secret", mask_sk["client-2"]),
        ("client-2 mask public", mask_pk["client-2"]),
        ("context", mask_ctx.decode()),
        ("shared secret", shared_12),
        ("seed", seed_12),
        ("first mask words", " ".join("%08x" % w for w in mask_words(seed_12, 8))),
    ]))

    # Vector H (used by G): client-1's two secrets shared among five holders, t = 3.
    t_h, xs_h = 3, [1, 2, 3, 4, 5]
    coeff_self = coefficients("fedmq vector H self-mask", t_h)
    coeff_key = coefficients("fedmq vector H mask key", t_h)
    shares_self = {x: shamir_share(self_seed["client-1"], coeff_self, x) for x in xs_h}
    shares_key = {x: shamir_share(mask_sk["client-1"], coeff_key, x) for x in xs_h}
    for sh, secret in [(shares_self, self_seed["client-1"]), (shares_key, mask_sk["client-1"])]:
        assert shamir_recover([sh[1], sh[2], sh[3]]) == secret
        assert shamir_recover([sh[5], sh[2], sh[4]]) == secret
    # A share of the other secret makes the interpolation inconsistent (a limb ≥ 2^32).
    assert shamir_recover([shares_self[1], shares_self[2], shares_key[3]]) is None

    # Vector G: client-1's shares for client-2 (x = 2), encrypted to it.
    share_ctx = b"share|" + context + b"|client-1|client-2"
    key_g, shared_g = agree(cipher_sk["client-1"], cipher_pk["client-2"], share_ctx)
    assert agree(cipher_sk["client-2"], cipher_pk["client-1"], share_ctx) == (key_g, shared_g)
    plain_g = shares_self[2] + shares_key[2]
    assert len(plain_g) == 132
    ct_g = AESGCM(key_g).encrypt(bytes(12), plain_g, share_ctx)
    assert len(ct_g) == 148
    print("\n#### G. A share encrypted to its holder\n")
    print(block([
        ("client-1 cipher secret", cipher_sk["client-1"]),
        ("client-1 cipher public", cipher_pk["client-1"]),
        ("client-2 cipher secret", cipher_sk["client-2"]),
        ("client-2 cipher public", cipher_pk["client-2"]),
        ("context", share_ctx.decode()),
        ("shared secret", shared_g),
        ("key", key_g),
        ("plaintext", plain_g),
        ("ciphertext", ct_g),
    ]))

    def limbs_hex(coeffs):
        return b"".join(struct.pack("<8Q", *a) for a in coeffs)

    print("\n#### H. Shamir shares\n")
    print(block(
        [("threshold", t_h),
         ("self-mask seed", self_seed["client-1"]),
         ("self-mask a1", struct.pack("<8Q", *coeff_self[0])),
         ("self-mask a2", struct.pack("<8Q", *coeff_self[1]))]
        + [(f"self-mask share {x}", shares_self[x]) for x in xs_h]
        + [("mask key", mask_sk["client-1"]),
           ("mask key a1", struct.pack("<8Q", *coeff_key[0])),
           ("mask key a2", struct.pack("<8Q", *coeff_key[1]))]
        + [(f"mask key share {x}", shares_key[x]) for x in xs_h]
    ))

    # Vector I: quantization, c = 1, N = 10, b = 28.
    c_i, n_i, b_i = 1.0, 10, 28
    inputs_i = ["0.0", "0.5", "-1.0", "1.0", "1.7", "-0.3333"]
    xs_i = [f32(float(s)) for s in inputs_i]
    qs_i = [quantize(x, c_i, b_i) for x in xs_i]
    sum_i = sum(qs_i)
    assert sum_i < 2**32
    clipped_sum = sum(min(max(x, -c_i), c_i) for x in xs_i)
    deq_i = dequantize_sum(sum_i, len(xs_i), c_i, b_i)
    bound_i = len(xs_i) * c_i / (2**b_i - 1)
    assert abs(deq_i - clipped_sum) <= bound_i
    # A tiny negative value: v + c rounds to 1.0 in f64, so q is the half-way point rounded away
    # from zero, where exact arithmetic would round down.
    tiny = f32(-1e-20)
    q_tiny = quantize(tiny, c_i, b_i)
    assert q_tiny == 2**27 and round_half_away((Fraction(tiny) + 1) * (2**b_i - 1) / 2) == 2**27 - 1
    print("\n#### I. Quantization\n")
    print(block([
        ("clip", c_i),
        ("clients", n_i),
        ("bits", b_i),
        ("inputs", ", ".join(inputs_i)),
        ("q", ", ".join(str(q) for q in qs_i)),
        ("q of NaN", quantize(float("nan"), c_i, b_i)),
        ("q of -1e-20", q_tiny),
        ("sum", sum_i),
        ("dequantized sum", repr(deq_i)),
        ("clipped sum", repr(clipped_sum)),
        ("error bound", repr(bound_i)),
    ]))

    # Vector J: three clients (complete graph, k = 2, t = 2), four coordinates.
    c_j, b_j, t_j = 1.0, 30, 2
    weights = {"client-1": 1, "client-2": 2, "client-3": 3}
    total = sum(weights.values())
    updates = {
        "client-1": ["0.5", "-0.25", "2.0", "0.0"],
        "client-2": ["-0.75", "0.125", "0.3", "-3.0"],
        "client-3": ["0.1", "0.9", "-0.6", "2.5"],
    }
    scaled = {c: [f32(f32(float(u)) * (weights[c] / total)) for u in us] for c, us in updates.items()}
    qj = {c: [quantize(v, c_j, b_j) for v in vs] for c, vs in scaled.items()}
    pair = {}
    for i in clients:
        for j in clients:
            if i < j:
                s, _ = agree(mask_sk[i], mask_pk[j], mask_ctx)
                assert s == agree(mask_sk[j], mask_pk[i], mask_ctx)[0]
                pair[(i, j)] = pair[(j, i)] = s
    assert pair[("client-1", "client-2")] == seed_12
    masked = {}
    for i in clients:
        y = [(q + m) % 2**32 for q, m in zip(qj[i], mask_words(self_seed[i], 4))]
        for j in clients:
            if j != i:
                sgn = 1 if i < j else -1
                y = [(v + sgn * m) % 2**32 for v, m in zip(y, mask_words(pair[(i, j)], 4))]
        masked[i] = y
    # The pairwise masks cancel: the sum less the self-masks is the sum of the q.
    total_y = [sum(masked[c][k] for c in clients) % 2**32 for k in range(4)]
    for c in clients:
        total_y = [(v - m) % 2**32 for v, m in zip(total_y, mask_words(self_seed[c], 4))]
    assert total_y == [sum(qj[c][k] for c in clients) for k in range(4)]
    # Holders of every secret: client-1, client-2, client-3 at x = 1, 2, 3.
    coeff_j = {c: coefficients(f"fedmq vector J self-mask {c}", t_j) for c in clients}
    coeff_k3 = coefficients("fedmq vector J mask key client-3", t_j)
    sshare = {(c, x): shamir_share(self_seed[c], coeff_j[c], x) for c in clients for x in (1, 2)}
    kshare = {x: shamir_share(mask_sk["client-3"], coeff_k3, x) for x in (1, 2)}
    for c in clients:
        assert shamir_recover([sshare[(c, 1)], sshare[(c, 2)]]) == self_seed[c]
    assert shamir_recover([kshare[1], kshare[2]]) == mask_sk["client-3"]

    def mean(survivors):
        """What the server unmasks: (S·2c/L − n·c) / (Σ weight / weight_total), as f32."""
        share = sum(weights[c] for c in survivors) / total
        return [
            f32(dequantize_sum(sum(qj[c][k] for c in survivors), len(survivors), c_j, b_j) / share)
            for k in range(4)
        ]

    mean_all = mean(clients)
    mean_12 = mean(["client-1", "client-2"])
    # Within the error bound of the weighted mean of the clipped scaled updates.
    for surv, got in [(clients, mean_all), (["client-1", "client-2"], mean_12)]:
        share = sum(weights[c] for c in surv) / total
        bound = len(surv) * c_j / (2**b_j - 1) / share
        for k in range(4):
            want = sum(min(max(scaled[c][k], -c_j), c_j) for c in surv) / share
            assert abs(got[k] - want) <= bound + 1e-7, (k, got[k], want)

    fields = [("clip", c_j), ("bits", b_j), ("threshold", t_j)]
    for c in clients:
        fields += [
            (f"{c} weight", weights[c]),
            (f"{c} update", ", ".join(updates[c])),
            (f"{c} scaled", ", ".join(f32_str(v) for v in scaled[c])),
            (f"{c} q", ", ".join(str(q) for q in qj[c])),
            (f"{c} mask secret", mask_sk[c]),
            (f"{c} self-mask seed", self_seed[c]),
            (f"{c} masked", ", ".join(str(v) for v in masked[c])),
        ]
    fields += [(f"{c} cipher public", cipher_pk[c]) for c in clients]
    for c in clients:
        for x in (1, 2):
            fields.append((f"{c} self-mask share {x}", sshare[(c, x)]))
    for x in (1, 2):
        fields.append((f"client-3 mask key share {x}", kshare[x]))
    fields += [
        ("mean", ", ".join(f32_str(v) for v in mean_all)),
        ("mean without client-3", ", ".join(f32_str(v) for v in mean_12)),
    ]
    print("\n#### J. Masked inputs of three clients\n")
    print(block(fields))

    # Vector K: LightSecAgg, four clients, U = 3, T = 1, masks of five values.
    n_k, u_k, t_k, len_k = 4, 3, 1, 5
    ell_k = -(-len_k // (u_k - t_k))
    owners_k = clients + ["client-4"]
    seeds_k = {c: self_seed[c] for c in clients}
    seeds_k["client-4"] = hashlib.sha256(b"fedmq vector K client-4 seed").digest()
    masks_k = {c: field_mask(seeds_k[c], len_k) for c in owners_k}
    noise_k = {
        c: [[int.from_bytes(hashlib.sha256(f"fedmq vector K noise {c} {r}".encode()).digest()[:4], "little") % LQ
             for r in range(ell_k)]]
        for c in owners_k
    }
    shares_k = {c: lsa_encode(masks_k[c], noise_k[c], n_k, u_k, t_k) for c in owners_k}
    # All four masked inputs arrived; client-3 then dropped: the responders are at x = 1, 2, 4.
    responders = [1, 2, 4]
    sums_k = {x: [sum(shares_k[c][x - 1][r] for c in owners_k) % LQ for r in range(ell_k)] for x in responders}
    agg = []
    for at in [n_k + k for k in range(1, u_k - t_k + 1)]:
        c = lagrange_at(responders, at)
        agg += [sum(cj * sums_k[x][r] for cj, x in zip(c, responders)) % LQ for r in range(ell_k)]
    agg = agg[:len_k]
    assert agg == [sum(masks_k[c][r] for c in owners_k) % LQ for r in range(len_k)]
    # Any T = 1 share alone is uniform: nothing to check here beyond the construction.
    fields = [("modulus", LQ), ("clients", n_k), ("active", u_k), ("privacy", t_k),
              ("length", len_k), ("share length", ell_k)]
    for c in owners_k:
        fields += [
            (f"{c} seed", seeds_k[c]),
            (f"{c} mask", ", ".join(str(v) for v in masks_k[c])),
            (f"{c} noise", ", ".join(str(v) for v in noise_k[c][0])),
        ]
        fields += [(f"{c} share {x}", ", ".join(str(v) for v in shares_k[c][x - 1])) for x in range(1, n_k + 1)]
    fields += [(f"summed share {x}", ", ".join(str(v) for v in sums_k[x])) for x in responders]
    fields += [("aggregate mask", ", ".join(str(v) for v in agg))]
    print("\n#### K. LightSecAgg coded mask shares\n")
    print(block(fields))

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
