#!/bin/bash
# Postfix (Debian package) as a virtual-mailbox host: the peer letterbox is
# measured against. Derived from ../shared/bench/postfix-peer.sh, with users
# named 0..N-1 instead of u0..u{N-1}: smtp-source's -r N makes recipients
# "N<to>", …, "2<to>", "<to>", so with numeric names every one of them is a
# real mailbox on both servers (see harness.py).
#   - listens on 127.0.0.1:${PORT:-2526}, no TLS
#   - domain bench.test, users 0..N-1 in an SQLite map (postfix-sqlite)
#   - delivers with virtual(8) into $BASE/bench.test/<n>/new, fsync'd like letterbox
# Usage: postfix-peer.sh [N_USERS]        Stop it with: postfix stop
# Postfix answers 250 once its own queue file is fsync'd and delivers
# afterwards, so the harness stops its clock when the last file is in new/.
set -euo pipefail
N=${1:-1000}
PORT=${PORT:-2526}
BASE=${BASE:-/var/mail/postfix-peer}
DB=/etc/postfix/peer.sqlite
export DEBIAN_FRONTEND=noninteractive
command -v postconf >/dev/null && [ -e /usr/lib/postfix/postfix-sqlite.so ] || {
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq && apt-get install -y -qq postfix postfix-sqlite sqlite3 >/dev/null
}
id vmail >/dev/null 2>&1 || useradd -r -u 5000 -U -d "$BASE" -s /usr/sbin/nologin vmail 2>/dev/null
rm -f "$DB"
{
  echo "create table domain(name text primary key, active int default 1);"
  echo "create table mailbox(address text primary key, maildir text, active int default 1);"
  echo "insert into domain(name) values('bench.test');"
  echo "begin;"
  for i in $(seq 0 $((N-1))); do echo "insert into mailbox values('$i@bench.test','bench.test/$i/',1);"; done
  echo "commit;"
} | sqlite3 "$DB"
chmod 644 "$DB"
printf 'dbpath = %s\nquery = SELECT 1 FROM domain WHERE name='"'"'%%s'"'"' AND active=1\n' "$DB" > /etc/postfix/peer-domains.cf
printf 'dbpath = %s\nquery = SELECT maildir FROM mailbox WHERE address='"'"'%%s'"'"' AND active=1\n' "$DB" > /etc/postfix/peer-mailboxes.cf
mkdir -p "$BASE" && chown -R vmail:vmail "$BASE"
# Debian's "No configuration" install leaves no main.cf; start from its defaults.
[ -e /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
postconf -e myhostname=peer.bench.test mydestination= mynetworks=127.0.0.0/8 inet_interfaces=loopback-only \
  virtual_mailbox_domains=sqlite:/etc/postfix/peer-domains.cf \
  virtual_mailbox_maps=sqlite:/etc/postfix/peer-mailboxes.cf \
  virtual_mailbox_base="$BASE" virtual_uid_maps=static:5000 virtual_gid_maps=static:5000 \
  smtpd_recipient_restrictions=reject_unauth_destination maillog_file=/var/log/postfix.log \
  smtpd_tls_security_level=none compatibility_level=3.6
# replace the port-25 service line with one on loopback:$PORT (no chroot)
sed -i -E "s/^([^#[:space:]]*smtp|127\.0\.0\.1:[0-9]+)[[:space:]]+inet[[:space:]].*smtpd$/127.0.0.1:$PORT inet n - n - - smtpd/" /etc/postfix/master.cf
postfix check
postfix stop >/dev/null 2>&1 || true
postfix start
for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
echo "postfix peer on 127.0.0.1:$PORT, maildirs under $BASE/bench.test/"
