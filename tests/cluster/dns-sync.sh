#!/usr/bin/env bash
# Keeps dnsmasq's hosts file current from the API: every Service with a
# cluster IP becomes "<ip> <svc>.<ns>.svc.cluster.local"; a headless Service
# gets one line per ready endpoint address, plus
# "<ip> <hostname>.<svc>.<ns>.svc.cluster.local" for endpoints with a hostname
# (StatefulSet pods). On change the file is replaced atomically and dnsmasq gets
# SIGHUP, which makes it re-read the file. Started and stopped by up.sh/down.sh.
# Usage: dns-sync.sh KUBECONFIG HOSTS-FILE DNSMASQ-PIDFILE [DOMAIN] [INTERVAL]
set -uo pipefail
kubeconfig=$1 hosts=$2 pidfile=$3 domain=${4:-cluster.local} interval=${5:-2}

template='{{range .items}}{{if eq .kind "Service"}}S {{.metadata.namespace}} {{.metadata.name}} {{.spec.clusterIP}}
{{else}}{{$ns := .metadata.namespace}}{{$n := .metadata.name}}{{range .subsets}}{{range .addresses}}E {{$ns}} {{$n}} {{.ip}} {{if .hostname}}{{.hostname}}{{end}}
{{end}}{{end}}{{end}}{{end}}'

while true; do
  if out=$(kubectl --kubeconfig "$kubeconfig" --request-timeout 5s get services,endpoints -A -o go-template="$template" 2>/dev/null); then
    awk -v d="$domain" '
      $1 == "S" { ip[$2 "/" $3] = $4 }
      $1 == "E" { n++; ens[n] = $2; esvc[n] = $3; eip[n] = $4; ehost[n] = $5 }
      END {
        for (k in ip) if (ip[k] != "None" && ip[k] != "") { split(k, a, "/"); print ip[k], a[2] "." a[1] ".svc." d }
        for (i = 1; i <= n; i++) {
          k = ens[i] "/" esvc[i]
          if (ip[k] == "None") print eip[i], esvc[i] "." ens[i] ".svc." d
          if (ehost[i] != "") print eip[i], ehost[i] "." esvc[i] "." ens[i] ".svc." d
        }
      }' <<<"$out" | LC_ALL=C sort -u > "$hosts.tmp"
    if ! cmp -s "$hosts.tmp" "$hosts"; then
      mv "$hosts.tmp" "$hosts"
      read -r pid _ < "$pidfile" 2>/dev/null && kill -HUP "$pid" 2>/dev/null
    else
      rm -f "$hosts.tmp"
    fi
  fi
  sleep "$interval"
done
