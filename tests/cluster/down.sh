#!/usr/bin/env bash
# Tear down Weir's test cluster and leave the machine as it was before up.sh:
# processes ended by their recorded pids (containers and shims by the pids in
# containerd's task bundles), mounts removed, /var/lib/kubelet, /var/log/pods,
# /var/lib/cni, /run/containerd and the cluster state removed, the cni0 bridge
# and the KUBE-*/CNI-* iptables chains deleted, ip_forward/route_localnet (and
# the bridge-netfilter sysctls) restored. Keeps the build cache
# (/var/cache/weir-cluster) and the installed Debian packages.
# Safe to run when nothing is up.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ $(id -u) == 0 ]] || die "must run as root"
log "tearing down the test cluster"
cleanup_node
log "done"
