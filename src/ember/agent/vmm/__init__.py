"""VMM drivers behind one interface (:mod:`ember.agent.vmm.base`): ``qemu`` (microvm;
TCG here, KVM where a probe boots) and ``firecracker`` (production)."""
