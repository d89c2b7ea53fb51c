# shellcheck shell=bash disable=SC2034
# Shared settings and helpers for Weir's local test cluster (sourced by up.sh,
# down.sh, build-k8s.sh and image.sh). Everything here is test infrastructure.

set -euo pipefail

CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Where the built Kubernetes lives (outside the checkout, keyed by the Debian
# source version) and where the running cluster keeps its state.
WEIR_CLUSTER_CACHE="${WEIR_CLUSTER_CACHE:-/var/cache/weir-cluster}"
STATE="${WEIR_CLUSTER_STATE:-/var/lib/weir-cluster}"
RUN="$STATE/run"          # pid files
LOGS="$STATE/logs"        # one log per component
PKI="$STATE/pki"
KUBECONFIG_ADMIN="$STATE/kubeconfig"

# Addresses: 198.18.0.0/15 is reserved for network testing (RFC 2544).
POD_CIDR="198.18.0.0/16"
SERVICE_CIDR="198.19.0.0/16"
KUBERNETES_SVC_IP="198.19.0.1"
CLUSTER_DOMAIN="cluster.local"
BRIDGE="cni0"

K8S_VERSION="v1.20.2"
PAUSE_IMAGE="k8s.gcr.io/pause:3.4-weir"
NODE_NAME="${WEIR_NODE_NAME:-$(hostname | tr 'A-Z_' 'a-z-')}"

# Components in start order; down.sh stops them in reverse.
COMPONENTS=(etcd containerd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy dnsmasq dns-sync)

log() { printf '[cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Debian source version of the kubernetes package (e.g. 1.20.5+really1.20.2-1.1+deb12u1):
# the newest apt knows, else the newest finished build in the cache. The deb-src entries that
# let apt know it are added by up.sh for the download only and removed again (SRC_LIST), so
# with a cached build neither up.sh nor build-k8s.sh needs them.
k8s_source_version() {
  local v d
  v=$(apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/ {print $2}' | sort -V | tail -1)
  if [[ -z "$v" ]]; then
    for d in "$WEIR_CLUSTER_CACHE"/*/bin/.complete; do
      [[ -f "$d" ]] && basename "$(dirname "$(dirname "$d")")"
    done | sort -V | tail -1
    return 0
  fi
  echo "$v"
}

# The deb-src list up.sh adds to download the kubernetes source package.
SRC_LIST=/etc/apt/sources.list.d/weir-cluster-src.sources

# Removes SRC_LIST and the source indices apt fetched for it (/var/lib/apt/lists/
# <host>_<path>_dists_<suite>_<component>_source_Sources*), unless another source list asks for
# deb-src too (then the indices are that list's as well and stay).
remove_src_list() {
  [[ -f "$SRC_LIST" ]] || return 0
  local other=false f uri suite comp prefix
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" && "$f" != "$SRC_LIST" ]] || continue
    grep -qE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' "$f" && other=true
  done
  if ! $other; then
    # one "uri suite component" line per combination of each stanza
    while read -r uri suite comp; do
      prefix=$(sed -E 's|^[a-z+]+://||; s|/+$||; s|/|_|g' <<< "$uri")_dists_${suite//\//_}_${comp}_source_Sources
      rm -f /var/lib/apt/lists/"$prefix" /var/lib/apt/lists/"$prefix".*
    done < <(awk 'BEGIN{RS=""} {
               u=""; s=""; c=""
               n=split($0, L, "\n")
               for (i=1; i<=n; i++) {
                 if (L[i] ~ /^URIs:/) u=substr(L[i], 6)
                 if (L[i] ~ /^Suites:/) s=substr(L[i], 8)
                 if (L[i] ~ /^Components:/) c=substr(L[i], 12)
               }
               nu=split(u, U, " "); ns=split(s, S, " "); nc=split(c, C, " ")
               for (a=1; a<=nu; a++) for (b=1; b<=ns; b++) for (d=1; d<=nc; d++) print U[a], S[b], C[d]
             }' "$SRC_LIST")
  fi
  rm -f "$SRC_LIST"
  log "removed $SRC_LIST and the source indices apt fetched for it"
}

# The node address: the source address of the default route, read at run time.
node_ip() {
  local dev ip
  dev=$(ip -4 route show default 2>/dev/null | awk '{for (i=1;i<=NF;i++) if ($i=="dev") {print $(i+1); exit}}')
  if [[ -n "$dev" ]]; then
    ip=$(ip -4 -o addr show dev "$dev" scope global | awk '{split($4,a,"/"); print a[1]; exit}')
  fi
  if [[ -z "${ip:-}" ]]; then
    ip=$(ip -4 -o addr show scope global | awk '$2 != "'"$BRIDGE"'" {split($4,a,"/"); print a[1]; exit}')
  fi
  [[ -n "${ip:-}" ]] || die "cannot find the node's IPv4 address"
  echo "$ip"
}

# Alive and not a zombie (exited children of pid 1 may wait a moment to be reaped).
pid_alive() {
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]
}

# Start time of a process (field 22 of /proc/PID/stat), to tell our process
# from a later one that reuses its pid.
pid_starttime() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

# Start a component in its own session; records "pid starttime" in $RUN/<name>.pid.
start_component() {
  local name=$1; shift
  mkdir -p "$RUN" "$LOGS"
  # AWS_EC2_METADATA_DISABLED: kubelet's in-tree ECR credential provider would
  # otherwise ask the EC2 metadata address (169.254.169.254) for credentials.
  # fd 9 (up.sh's lock) is not passed on.
  AWS_EC2_METADATA_DISABLED=true setsid "$@" >>"$LOGS/$name.log" 2>&1 < /dev/null 9>&- &
  local pid=$!
  sleep 0.1
  echo "$pid $(pid_starttime "$pid")" > "$RUN/$name.pid"
}

# The pid from $RUN/<name>.pid if that process is still the one we started.
component_pid() {
  local pidfile="$RUN/$1.pid" pid st
  [[ -f "$pidfile" ]] || return 1
  read -r pid st < "$pidfile" || return 1
  pid_alive "$pid" || return 1
  [[ -z "$st" || "$(pid_starttime "$pid")" == "$st" ]] || return 1
  echo "$pid"
}

# Stop one component by its recorded pid: TERM, then KILL after 10 s.
stop_component() {
  local name=$1 pid i t0=$SECONDS
  if pid=$(component_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then
      log "$name (pid $pid) still running 10 s after TERM: KILL"
      kill -KILL "$pid" 2>/dev/null || true; sleep 0.3
    fi
    log "stopped $name (pid $pid) in $((SECONDS - t0))s"
  fi
  rm -f "$RUN/$name.pid"
}

# Container processes and shims left by containerd, found by pid: each task's
# bundle /run/containerd/io.containerd.runtime.v2.task/<ns>/<id>/ has init.pid
# (the container's first process; its parent is the shim) and address (the
# shim's socket, whose listening process is the shim).
kill_container_processes() {
  local b pid ppid sock shims=()
  for b in /run/containerd/io.containerd.runtime.v2.task/*/*/; do
    [[ -d "$b" ]] || continue
    if [[ -f "$b/init.pid" ]]; then
      pid=$(cat "$b/init.pid" 2>/dev/null || true)
      if pid_alive "$pid"; then
        ppid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || true)
        [[ -n "$ppid" ]] && grep -qa containerd-shim "/proc/$ppid/cmdline" 2>/dev/null && shims+=("$ppid")
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    if [[ -f "$b/address" ]]; then
      sock=$(sed 's|^unix://||' "$b/address" 2>/dev/null || true)
      if [[ -n "$sock" ]]; then
        for pid in $(ss -xlpn 2>/dev/null | awk -v s="$sock" '$5 == s' | grep -oE "pid=[0-9]+" | cut -d= -f2 || true); do
          shims+=("$pid")
        done
      fi
    fi
  done
  for pid in $(printf '%s\n' "${shims[@]}" | sort -u); do
    grep -qa containerd-shim "/proc/$pid/cmdline" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  done
  (( ${#shims[@]} )) && sleep 0.5
  return 0
}

# Unmount everything below the given directories, deepest first.
unmount_below() {
  local dir m
  for dir in "$@"; do
    while read -r m; do
      [[ -n "$m" ]] || continue
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "WARNING: cannot unmount $m"
    done < <(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo \
               | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-)
  done
}

# Remove the KUBE-*, CNI-* and WEIR-TEST-* chains (and the rules that jump to them) from
# every table, for IPv4 and IPv6. kube-proxy --cleanup leaves some; kubelet
# makes KUBE-FIREWALL, KUBE-MARK-* and KUBE-KUBELET-CANARY in both families.
delete_kube_chains() {
  local cmd t rule c
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null || continue
    for t in filter nat mangle raw; do
      "$cmd"-save -t "$t" >/dev/null 2>&1 || continue
      while read -r rule; do
        eval "$cmd -w -t $t ${rule/#-A/-D}" 2>/dev/null || true
      done < <("$cmd"-save -t "$t" | grep -E '^-A ' | grep -E -- '-j (KUBE-|CNI-|WEIR-TEST-)|-g (KUBE-|CNI-|WEIR-TEST-)' \
                 | grep -vE '^-A (KUBE-|CNI-|WEIR-TEST-)')
      for c in $("$cmd"-save -t "$t" | awk '/^:(KUBE-|CNI-|WEIR-TEST-)/ {print substr($1, 2)}'); do
        "$cmd" -w -t "$t" -F "$c" 2>/dev/null || true
      done
      for c in $("$cmd"-save -t "$t" | awk '/^:(KUBE-|CNI-|WEIR-TEST-)/ {print substr($1, 2)}'); do
        "$cmd" -w -t "$t" -X "$c" 2>/dev/null || true
      done
    done
  done
}

# Remove cgroups kubelet made (cgroupfs driver): kubepods* in every v1 hierarchy.
remove_kube_cgroups() {
  local h
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
    [[ -d "$h/kubepods" || -d "$h/kubepods.slice" ]] || continue
    find "$h"kubepods* -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

SYSCTLS=(net/ipv4/ip_forward net/ipv4/conf/all/route_localnet net/bridge/bridge-nf-call-iptables net/bridge/bridge-nf-call-ip6tables)
SYSCTL_SAVE="$WEIR_CLUSTER_CACHE/sysctl.orig"   # outside $STATE: survives the state cleanup
NFT_SAVE="$WEIR_CLUSTER_CACHE/nft-tables.orig"

save_sysctls() {
  [[ -f "$SYSCTL_SAVE" ]] && return 0   # an earlier, unfinished run saved the machine's values
  mkdir -p "$(dirname "$SYSCTL_SAVE")"
  local k
  for k in "${SYSCTLS[@]}"; do
    [[ -f "/proc/sys/$k" ]] && echo "$k $(cat "/proc/sys/$k")"
  done > "$SYSCTL_SAVE.tmp"
  mv "$SYSCTL_SAVE.tmp" "$SYSCTL_SAVE"
  # nftables tables that exist now (iptables-nft makes tables on first use)
  if command -v nft >/dev/null; then nft list tables 2>/dev/null > "$NFT_SAVE" || true; fi
}

restore_sysctls() {
  [[ -f "$SYSCTL_SAVE" ]] || return 0
  local k v
  while read -r k v; do
    [[ -f "/proc/sys/$k" ]] && echo "$v" > "/proc/sys/$k" 2>/dev/null || true
  done < "$SYSCTL_SAVE"
  rm -f "$SYSCTL_SAVE"
  # Drop the nftables tables that did not exist before up.sh and hold no rule now.
  if [[ -f "$NFT_SAVE" ]] && command -v nft >/dev/null; then
    local fam tbl
    while read -r _ fam tbl; do
      grep -qx "table $fam $tbl" "$NFT_SAVE" && continue
      # rule lines are indented by two tabs; chain headers start with "type "
      if ! nft list table "$fam" "$tbl" 2>/dev/null | grep -P '^\t\t' | grep -vqP '^\t\ttype '; then
        nft delete table "$fam" "$tbl" 2>/dev/null || true
      fi
    done < <(nft list tables 2>/dev/null)
  fi
  rm -f "$NFT_SAVE"
}

# Everything a running or interrupted cluster leaves on the machine, removed.
# Used by down.sh and at the start of up.sh. Keeps the build cache.
cleanup_node() {
  local i name ns
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name=${COMPONENTS[$i]}
    # The pods go before the apiserver: their watches (the operator's, any in-cluster client)
    # would hold its graceful shutdown until the KILL 10 s later (issue #22, 10).
    [[ $name == kube-apiserver ]] && kill_container_processes
    stop_component "$name"
  done
  kill_container_processes
  # Network namespaces of pods (containerd 1.6 keeps them under /run/netns/cni-*).
  for ns in /run/netns/cni-*; do
    [[ -e "$ns" ]] || continue
    ip netns delete "$(basename "$ns")" 2>/dev/null || { umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null; rm -f "$ns"; }
  done
  rmdir /run/netns 2>/dev/null || true
  unmount_below /run/containerd /var/lib/kubelet "$STATE"
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE" 2>/dev/null || true
  ip link show kube-ipvs0 >/dev/null 2>&1 && ip link delete kube-ipvs0 2>/dev/null || true
  delete_kube_chains
  # connection-tracking entries of the pod and Service ranges
  if command -v conntrack >/dev/null; then
    local cidr
    for cidr in "$POD_CIDR" "$SERVICE_CIDR"; do
      conntrack -D -s "$cidr" >/dev/null 2>&1 || true
      conntrack -D -d "$cidr" >/dev/null 2>&1 || true
    done
  fi
  remove_kube_cgroups
  rm -rf /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/containerd "$STATE"
  restore_sysctls
}
