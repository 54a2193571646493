#!/bin/bash
# PID 1 of a local node, as root, inside its own PID, mount and cgroup namespaces (and
# network namespace, when the node has one). Prepares what a booting machine would have,
# starts the service user's systemd manager, and waits. Killing this process is a power cut:
# every process of the node dies with it and the tmpfs mounts vanish.
set -euo pipefail
node=$1 user=$2
uid=$(id -u "$user") gid=$(id -g "$user")

# A private cgroup2 view; the node's root is the cgroup the runner created for it.
mount -t cgroup2 none /sys/fs/cgroup
manager=/sys/fs/cgroup/user.slice/user-$uid.slice/user@$uid.service
# archy-podman: a cgroup of the user's own beside the manager's units, where the agent
# (podman backend) puts podman, so conmon does not die with the agent's service (FM3).
mkdir -p "$manager/archy-podman"
chown -R "$uid:$gid" "$manager"

# Volatile state of a machine: the runtime dir, /run/systemd, /dev/shm.
mount -t tmpfs -o "mode=0700,uid=$uid,gid=$gid" tmpfs "$node/run"
mkdir -p /run/systemd
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system # "booted with systemd"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ip link set lo up 2>/dev/null || true

echo $$ > "$manager/cgroup.procs"
setpriv --reuid "$uid" --regid "$gid" --init-groups -- env -i \
  HOME="$node/home" XDG_RUNTIME_DIR="$node/run" USER="$user" LOGNAME="$user" \
  PATH=/usr/local/bin:/usr/bin:/bin \
  /lib/systemd/systemd --user &
manager_pid=$!
# Graceful shutdown: stop the manager (which stops every unit), then leave.
trap 'kill -TERM $manager_pid 2>/dev/null; wait $manager_pid; exit 0' TERM
while :; do
  wait $manager_pid && exit 0 || { rc=$?; [ $rc -gt 128 ] || exit $rc; }
done
