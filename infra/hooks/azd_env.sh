# Sourced by the azd hooks (preprovision.sh, postdeploy.sh), never run on its own: their messages,
# and the azd environment read for the names each hook needs.
#
# Usage, with HOOK set to the hook's name:
#   HOOK=postdeploy
#   . "$(dirname "$0")/azd_env.sh"
#   load_azd_env NAME1 NAME2 ...

HOOKS_DIR=${HOOKS_DIR:-$(dirname "$0")}

say() { printf '%s: %s\n' "$HOOK" "$*"; }
fail() {
    printf '%s: ERROR: %s\n' "$HOOK" "$*" >&2
    exit 1
}

# azd exports its environment to hooks; when run by hand, read it from `azd env get-values`.
# A variable already set wins. Lines are KEY="value"; only the names given are taken, never eval'd
# as code (the one eval reads a variable whose name is one of those fixed names).
load_azd_env() {
    command -v azd >/dev/null 2>&1 || return 0
    values=$(azd env get-values 2>/dev/null) || return 0
    while IFS= read -r line; do
        key=${line%%=*}
        value=${line#*=}
        value=${value#\"}
        value=${value%\"}
        for wanted in "$@"; do
            [ "$key" = "$wanted" ] || continue
            current=$(eval "printf '%s' \"\${$key:-}\"")
            [ -n "$current" ] || export "$key=$value"
        done
    done <<EOF
$values
EOF
}

# The default infra/main.parameters.json gives an azd variable ("${NAME=default}"): the hooks use the
# deployment's own defaults, read from that one file, instead of keeping a copy of them here.
azd_default() {
    value=$(sed -n "s/.*\"\${$1=\([^}]*\)}\".*/\1/p" "$HOOKS_DIR/../main.parameters.json" | head -n 1)
    [ -n "$value" ] || fail "infra/main.parameters.json gives $1 no default"
    printf '%s' "$value"
}
