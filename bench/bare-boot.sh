#!/usr/bin/env bash
# The bare baseline of `make bench-boot` (src/ember/bench/boot.py): a guest booted by QEMU
# directly, with nothing of the agent in between (no image store, network setup, config
# drive writing, shim, cgroup or QMP handshake).
#
#   bare-boot.sh prepare DIR VM_ID KERNEL INITRD ROOTFS CONFIG_DRIVE TAP MAC ACCEL [VCPUS [MEMORY_MB]]
#       writes DIR/qemu.argv: the qemu driver's own command line for these files
#       (ember.agent.vmm.qemu.qemu_argv, printed by `python -m ember.bench.boot qemu-argv`),
#       so the baseline cannot drift from what the agent runs. ACCEL: kvm or tcg.
#   bare-boot.sh boot DIR
#       runs that command line; the serial console goes to DIR/console.log, QEMU's
#       stderr to DIR/qemu.log. Runs until QEMU exits (or is killed).
#
# The files and the tap must exist: ROOTFS a writable copy of an image's ext4, CONFIG_DRIVE
# from ember.agent.guest_config.write_config_drive, TAP up with the host's addresses and
# the route to the guest (ember.agent.net.taps.TapNetwork.create). PYTHON (default: the
# checkout's .venv) runs the prepare step.
set -euo pipefail

usage() {
    sed -n '6,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

case "${1:-}" in
prepare)
    [ $# -ge 10 ] && [ $# -le 12 ] || usage
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    python=${PYTHON:-$root/.venv/bin/python}
    dir=$2
    mkdir -p "$dir"
    "$python" -m ember.bench.boot qemu-argv \
        --workdir "$dir" --vm-id "$3" --kernel "$4" --initrd "$5" --rootfs "$6" \
        --config-drive "$7" --tap "$8" --mac "$9" --accel "${10}" \
        --vcpus "${11:-1}" --memory-mb "${12:-256}" >"$dir/qemu.argv.tmp"
    mv "$dir/qemu.argv.tmp" "$dir/qemu.argv"
    ;;
boot)
    [ $# -eq 2 ] || usage
    dir=$2
    mapfile -d '' -t argv <"$dir/qemu.argv"
    exec "${argv[@]}" </dev/null >"$dir/console.log" 2>"$dir/qemu.log"
    ;;
*)
    usage
    ;;
esac
