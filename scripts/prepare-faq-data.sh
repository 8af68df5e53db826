#!/usr/bin/env bash
# Build the Python-documentation corpus and the Python FAQ question set in git-ignored data/:
#
#   data/.cache/python3.11-doc_<version>_all.deb   the Debian package (apt-get download, sha256-pinned)
#   data/python-doc/                                its HTML documentation root (faq/, library/,
#                                                   tutorial/, index.html, ...), HTML pages only
#   data/python-faq/questions.jsonl                 the FAQ question/answer pairs, one JSON object a
#                                                   line (scripts/extract_faq.py, standard library)
#
# data/python-doc/ is swapped in atomically (extracted into a temp folder, then renamed), and
# questions.jsonl is written to a temp file and renamed. Idempotent: each output carries a .stamp
# (package sha256; for the FAQ also the extractor's sha256), and a second run with unchanged
# inputs is a fast no-op.
# Usage: scripts/prepare-faq-data.sh [--force]
#   --force  rebuild both outputs even if they are up to date
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="python3.11-doc"
VERSION="3.11.2-6+deb12u7"                    # Debian 12 (bookworm) main
DEB="python3.11-doc_3.11.2-6+deb12u7_all.deb"
DEB_SHA256="eafa42c54a08dcf3892d2e9f8e29644877c241d09186ca19a4d06129a339c9f3"
HTML_IN_DEB="usr/share/doc/python3.11/html"   # the documentation root inside the package

CACHE="data/.cache"
DOC="data/python-doc"
FAQ_DIR="data/python-faq"
FAQ="$FAQ_DIR/questions.jsonl"

log() { printf 'prepare-faq-data: %s\n' "$*"; }
die() { printf 'prepare-faq-data: error: %s\n' "$*" >&2; exit 1; }

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (usage: scripts/prepare-faq-data.sh [--force])" ;;
    esac
done

sha256() { sha256sum "$1" | cut -d' ' -f1; }
doc_stamp="$PKG $VERSION $DEB_SHA256"
faq_stamp="$doc_stamp extract_faq.py $(sha256 scripts/extract_faq.py)"

doc_ready() {
    [ "$(cat "$DOC/.stamp" 2>/dev/null)" = "$doc_stamp" ] && [ -f "$DOC/faq/programming.html" ]
}
faq_ready() {
    [ "$(cat "$FAQ_DIR/.stamp" 2>/dev/null)" = "$faq_stamp" ] && [ -s "$FAQ" ]
}

if [ "$force" = 0 ] && doc_ready && faq_ready; then
    log "$DOC/ ($(find "$DOC" -name '*.html' -type f | wc -l) HTML pages) and $FAQ ($(wc -l < "$FAQ") entries) are up to date: data is ready (use --force to rebuild)"
    exit 0
fi

command -v python3 >/dev/null || die "python3 not found (scripts/extract_faq.py needs Python 3, standard library only)"
mkdir -p "$CACHE"

# --- 1. the package ---------------------------------------------------------------------------
# Verified on every rebuild; a cached file with the wrong checksum is downloaded again.
fetch_deb() {
    if [ -f "$CACHE/$DEB" ]; then
        local got; got="$(sha256 "$CACHE/$DEB")"
        if [ "$got" = "$DEB_SHA256" ]; then
            log "using cached $CACHE/$DEB (sha256 ok)"
            return
        fi
        log "cached $CACHE/$DEB has sha256 $got, expected $DEB_SHA256; downloading again"
        rm -f "$CACHE/$DEB"
    fi
    command -v apt-get >/dev/null || die "apt-get not found: $PKG $VERSION is a Debian package (put $DEB into $CACHE/ by hand)"
    log "downloading $PKG=$VERSION with apt-get download into $CACHE/"
    local tmp; tmp="$(mktemp -d "$CACHE/.download.XXXXXX")"
    local sandbox=()
    # as root apt drops to user _apt, which cannot write into our folder: stay root (no warning)
    [ "$(id -u)" = 0 ] && sandbox=(-o APT::Sandbox::User=root)
    if ! (cd "$tmp" && apt-get download -q "${sandbox[@]}" "$PKG=$VERSION"); then
        rm -rf "$tmp"
        die "apt-get download $PKG=$VERSION failed. Is a Debian bookworm mirror configured and reachable (try 'apt-get update'; 'apt-cache policy $PKG' lists the versions on offer)? If the mirror no longer has $VERSION, pin the new version and its sha256 in $0."
    fi
    [ -f "$tmp/$DEB" ] || { ls -la "$tmp" >&2; rm -rf "$tmp"; die "apt-get download did not produce $DEB"; }
    local got; got="$(sha256 "$tmp/$DEB")"
    if [ "$got" != "$DEB_SHA256" ]; then
        rm -rf "$tmp"
        die "checksum mismatch for $CACHE/$DEB (just downloaded by apt-get, not kept): expected sha256 $DEB_SHA256, got $got. The package on the mirror is not the one this script was written for; refusing to use it."
    fi
    mv "$tmp/$DEB" "$CACHE/$DEB"
    rmdir "$tmp"
    log "downloaded $CACHE/$DEB ($(du -h "$CACHE/$DEB" | cut -f1), sha256 ok)"
}

# --- 2. the HTML documentation root ----------------------------------------------------------
build_doc() {
    fetch_deb
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found (needed to unpack $DEB)"
    local tmp; tmp="$(mktemp -d "data/.python-doc.build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    log "extracting $DEB"
    dpkg-deb -x "$CACHE/$DEB" "$tmp/pkg"
    local html="$tmp/pkg/$HTML_IN_DEB"
    [ -f "$html/faq/programming.html" ] || die "$DEB has no $HTML_IN_DEB/faq/programming.html"
    # Keep the HTML pages only: drop the reStructuredText copies (_sources/), theme JS/CSS
    # (_static/, two of them dangling symlinks into /usr/share/javascript), images (_images/),
    # example downloads (_downloads/), the search index, objects.inv, the devhelp book and the
    # gzip-compressed 3.9 MB changelog (whatsnew/changelog.html.gz).
    rm -rf "$html/_sources" "$html/_static" "$html/_images" "$html/_downloads"
    find "$html" \( -type f -o -type l \) ! -name '*.html' -delete
    find "$html" -mindepth 1 -type d -empty -delete
    printf '%s\n' "$doc_stamp" > "$html/.stamp"
    chmod 755 "$html"
    # Swap the finished folder in: readers see the old data/python-doc or the new one.
    if [ -e "$DOC" ]; then
        mv "$DOC" "$tmp/old"
    fi
    mv "$html" "$DOC"
    rm -rf "$tmp"
    trap - EXIT
    log "wrote $DOC/ ($(find "$DOC" -name '*.html' -type f | wc -l) HTML pages, $(du -sh "$DOC" | cut -f1))"
}

if [ "$force" = 1 ] || ! doc_ready; then
    build_doc
else
    log "$DOC/ is up to date"
fi

# --- 3. the FAQ question/answer pairs --------------------------------------------------------
mkdir -p "$FAQ_DIR"
rm -f "$FAQ_DIR/.stamp"
python3 scripts/extract_faq.py --doc "$DOC" --out "$FAQ"
printf '%s\n' "$faq_stamp" > "$FAQ_DIR/.stamp"

# --- 4. summary -------------------------------------------------------------------------------
faq_pages="$(find "$DOC/faq" -name '*.html' ! -name index.html -type f | wc -l)"
log "summary: $PKG $VERSION; $DOC/ holds $(find "$DOC" -name '*.html' -type f | wc -l) HTML pages;" \
    "$faq_pages FAQ pages -> $(wc -l < "$FAQ") entries in $FAQ"
