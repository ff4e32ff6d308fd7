#!/usr/bin/env bash
# Runs a kernel test binary on an emulated AVX-512 CPU, for machines without one (run by hand,
# not by .ci/run: a boot takes about two minutes). QEMU's TCG has no AVX-512; Bochs does. Its
# `tigerlake` model has AVX-512 F/BW/VL/VNNI (no BF16, no AMX), so the `avx512` tier and its
# VNNI quant bodies run, and the tests check them against the scalar oracle like any tier.
#
#   .ci/avx512-emulated.sh [TEST-BINARY [TEST-NAME-FILTER...]]    (default: quant)
#   .ci/avx512-emulated.sh cli MODEL...    (models of fixtures/registry/llama, e.g. gguf-q4_0)
#
# The `cli` form runs the static CLI's greedy `infer` on each fixture model with
# SPINFER_ISA=avx512 in the emulator and fails unless each text equals the same CLI's with
# SPINFER_ISA=avx2 on this machine: the whole forward pass, end to end, on both tiers.
#
# How: the static x86_64-musl test binary goes into an initramfs beside a small /init that
# runs it; Debian's cloud kernel boots it from an ISO (isolinux) in Bochs, console on the
# serial port. The script prints the test's output and fails unless it says "test result: ok".
# Installs what it uses (Debian packages bochs, xorriso, isolinux; needs root) and keeps its
# files in target/avx512-emulated/.
#
# Bochs 2.7 needs these kernel arguments (found by trial, Debian bookworm, 2026-11):
#   - clearcpuid=aperfmperf,xsaveopt,xsavec,xsaves,pku (as numbers): Bochs reports XSAVE
#     sizes the kernel rejects (it then turns XSAVE, and with it AVX, off), and faults on
#     the APERF/MPERF MSRs it advertises;
#   - a 6.12 kernel: 6.1 (bookworm's own) hangs right after "Mountpoint-cache hash table".
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=${1:-quant}
shift || true
X64M=x86_64-unknown-linux-musl
TGT=${CARGO_TARGET_DIR:-target}
W=$TGT/avx512-emulated
mkdir -p "$W"

need=()
command -v bochs >/dev/null || need+=(bochs bochsbios vgabios)
command -v xorriso >/dev/null || need+=(xorriso)
[ -e /usr/lib/ISOLINUX/isolinux.bin ] || need+=(isolinux syslinux-common)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The kernel: Debian's newest cloud flavour (few drivers, a short boot; serial console built in).
if [ ! -e "$W/vmlinuz" ]; then
    pkg=$(apt-cache search --names-only '^linux-image-[0-9.+a-z-]+-cloud-amd64-unsigned$' \
        | cut -d' ' -f1 | sort -V | tail -1)
    case $pkg in
    linux-image-6.1.*) echo "avx512-emulated: $pkg is 6.1, which hangs in Bochs; needs 6.12+" >&2
        exit 1 ;;
    esac
    (cd "$W" && apt-get download "$pkg" && dpkg-deb -x "$pkg"_*.deb kroot)
    cp "$W"/kroot/boot/vmlinuz-* "$W/vmlinuz"
    rm -rf "$W/kroot" "$W/$pkg"_*.deb
fi

rustup target add "$X64M" >/dev/null
infer=(infer --registry "$PWD/fixtures/registry" --temperature 0 --max-tokens 16 --json Once)
if [ "$TEST" = cli ]; then
    cargo build --release -p spinfer-cli --target "$X64M"
    bin=$TGT/$X64M/release/spinfer
    for m in "$@"; do
        printf 'avx512-emulated: %s: %s\n' "$m" \
            "$(SPINFER_ISA=avx2 "$bin" "${infer[@]}" --model "$m")"
    done > "$W/want.txt"
else
    bin=$(cargo test -p spinfer-kernels --test "$TEST" --release --target "$X64M" --no-run \
        --message-format=json \
        | python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
fi
[ -x "$bin" ] || { echo "avx512-emulated: no test binary for $TEST" >&2; exit 1; }

# /init runs /test with the arguments after "--" on the kernel command line, then waits: if
# init exited, the kernel would panic before the serial port had sent the test's last lines.
cat > "$W/init.rs" <<'RS'
fn main() {
    println!(
        "avx512-emulated: this CPU has avx512f {} avx512bw {} avx512vl {} avx512vnni {}",
        is_x86_feature_detected!("avx512f"),
        is_x86_feature_detected!("avx512bw"),
        is_x86_feature_detected!("avx512vl"),
        is_x86_feature_detected!("avx512vnni"),
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cli` form (EMU_INFER holds the infer arguments, `|`-separated): one greedy run per model.
    if let Ok(infer) = std::env::var("EMU_INFER") {
        for m in &args {
            let out = std::process::Command::new("/test")
                .env("SPINFER_ISA", "avx512")
                .args(infer.split('|'))
                .args(["--model", m])
                .output();
            match out {
                Ok(o) => {
                    let text = String::from_utf8_lossy(&o.stdout);
                    println!("avx512-emulated: {m}: {}", text.trim_end());
                    eprint!("{}", String::from_utf8_lossy(&o.stderr));
                }
                Err(e) => println!("avx512-emulated: {m} did not run: {e}"),
            }
        }
        println!("avx512-emulated: /test exited: done");
    } else {
        let status = std::process::Command::new("/test").args(&args).status();
        println!("avx512-emulated: /test exited: {status:?}");
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
RS
rustc --edition 2021 -O --target "$X64M" -o "$W/init" "$W/init.rs"

# The initramfs (newc cpio): /dev/console, so that init has a stdout; /dev/null (a child's
# stdin); /init; /test; and, at their absolute paths, the reference file `tests/quant.rs`
# reads and the `cli` form's models.
python3 - "$W/init" "$bin" "$W/initrd" "$PWD" "$TEST" "$@" <<'PY'
import os, sys
init, test, out, root, mode = sys.argv[1:6]
models = sys.argv[6:] if mode == "cli" else []
def entry(name, mode, data=b"", rdev=(0, 0)):
    name = name.encode() + b"\0"
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0]
    h = b"070701" + b"".join(b"%08X" % f for f in fields) + name
    h += b"\0" * (-len(h) % 4)
    return h + data + b"\0" * (-len(data) % 4)
with open(out, "wb") as f:
    f.write(entry("dev", 0o040755))
    f.write(entry("dev/console", 0o020600, rdev=(5, 1)))
    f.write(entry("dev/null", 0o020666, rdev=(1, 3)))
    f.write(entry("init", 0o100755, open(init, "rb").read()))
    f.write(entry("test", 0o100755, open(test, "rb").read()))
    files = ["fixtures/reference/quant/blocks.json"]
    for m in models:
        d = os.path.join("fixtures/registry/llama", m)
        files += [os.path.join(d, n) for n in sorted(os.listdir(d))]
    dirs = set()
    parents = [os.path.dirname(os.path.join(root, p)) for p in files]
    for p in [os.path.join(root, "kernels")] + parents:
        while p != "/":
            dirs.add(p)
            p = os.path.dirname(p)
    for d in sorted(dirs):
        f.write(entry(d.lstrip("/"), 0o040755))
    for p in files:
        f.write(entry(os.path.join(root, p).lstrip("/"), 0o100644, open(p, "rb").read()))
    f.write(entry("TRAILER!!!", 0))
PY

if [ "$TEST" = cli ]; then
    args="EMU_INFER=$(IFS='|'; echo "${infer[*]}") -- $*"
else
    args="-- --test-threads=1 $*"
fi
mkdir -p "$W/iso"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$W/iso/"
cp "$W/vmlinuz" "$W/iso/vmlinuz"
gzip -1 -c "$W/initrd" > "$W/iso/initrd.gz"
# clearcpuid: 124 aperfmperf, 320 xsaveopt, 321 xsavec, 323 xsaves, 515 pku (see the top).
cat > "$W/iso/isolinux.cfg" <<EOF
DEFAULT t
LABEL t
  KERNEL vmlinuz
  APPEND initrd=initrd.gz console=ttyS0 quiet clearcpuid=124,320,321,323,515 panic=-1 $args
EOF
xorriso -as mkisofs -quiet -o "$W/boot.iso" -b isolinux.bin -c boot.cat -no-emul-boot \
    -boot-load-size 4 -boot-info-table "$W/iso"

rm -f "$W/serial.txt"
cat > "$W/bochsrc" <<EOF
cpu: model=tigerlake, count=1, ips=200000000
memory: guest=1024, host=1024
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0-master: type=cdrom, path=$W/boot.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$W/serial.txt
display_library: rfb, options="timeout=0"
sound: driver=dummy
clock: sync=none
log: $W/bochs.log
panic: action=fatal
error: action=report
EOF
echo "avx512-emulated: booting $(basename "$bin") ($args) in Bochs (tigerlake)..."
t0=$SECONDS
# Debian's Bochs has its debugger built in: "c" (continue) starts the run. A guest that hangs
# (a kernel that does not boot) is stopped after AVX512_EMU_LIMIT seconds (default 3600).
limit=${AVX512_EMU_LIMIT:-3600}
echo c > "$W/debugger.rc"
bochs -q -f "$W/bochsrc" -rc "$W/debugger.rc" </dev/null >"$W/bochs.out" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
    if grep -q -E "avx512-emulated: /test exited|Kernel panic" "$W/serial.txt" 2>/dev/null; then
        break
    fi
    if [ $((SECONDS - t0)) -gt "$limit" ]; then
        echo "avx512-emulated: no result after $limit s; stopping Bochs" >&2
        break
    fi
    sleep 2
done
kill $pid 2>/dev/null || true
wait $pid 2>/dev/null || true
tr -d '\r' < "$W/serial.txt" | grep -v -E "^\[ *[0-9.]+\]" || true
echo "avx512-emulated: $((SECONDS - t0)) s in Bochs"
# Without AVX-512 in the guest the tests would pass on the other tiers alone: require it.
grep -q "this CPU has avx512f true avx512bw true avx512vl true avx512vnni true" "$W/serial.txt" \
    || { echo "avx512-emulated: the guest CPU lacks AVX-512 F/BW/VL/VNNI" >&2; exit 1; }
if [ "$TEST" = cli ]; then
    tr -d '\r' < "$W/serial.txt" | grep -E "^avx512-emulated: [^ ]+: " \
        | grep -v "this CPU has" > "$W/got.txt" || true
    echo "avx512-emulated: the same CLI with SPINFER_ISA=avx2 on this machine:"
    cat "$W/want.txt"
    diff "$W/want.txt" "$W/got.txt" && echo "avx512-emulated: avx512 and avx2 texts equal"
else
    grep -q "test result: ok" "$W/serial.txt"
fi
