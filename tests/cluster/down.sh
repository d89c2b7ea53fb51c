#!/usr/bin/env bash
# Tear down Weir's test cluster and leave the machine as it was before up.sh:
# processes ended by their recorded pids (containers and shims by the pids in
# containerd's task bundles), mounts removed, /var/lib/kubelet, /var/log/pods,
# /var/lib/cni, /run/containerd and the cluster state removed, the cni0 bridge
# and the KUBE-*/CNI-* iptables chains deleted, ip_forward/route_localnet (and
# the bridge-netfilter sysctls) restored, the deb-src list up.sh adds for the source download
# (/etc/apt/sources.list.d/weir-cluster-src.sources) removed with the indices apt fetched for
# it. Keeps the build cache (/var/cache/weir-cluster) and the installed Debian packages.
# Safe to run when nothing is up.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[[ $(id -u) == 0 ]] || die "must run as root"
mkdir -p "$WEIR_CLUSTER_CACHE"
exec 9>"$WEIR_CLUSTER_CACHE/.lock"
flock -w 600 9 || die "another up.sh/down.sh holds $WEIR_CLUSTER_CACHE/.lock"
log "tearing down the test cluster"
cleanup_node
remove_src_list
log "done in $SECONDS s"
