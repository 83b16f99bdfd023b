#!/bin/sh
# azd preprovision hook: stop before provisioning if the chosen region does not offer the chosen
# model, version and deployment SKU (primary, and the fallback when one is deployed).
#
# Models retire every few months (shared/model_catalog.json); a deployment of a model the region
# no longer offers fails deep inside `azd provision` with a terse ARM error. This asks the region
# first, with `az cognitiveservices model list --location <region>`, and when the choice is not
# offered it lists what is, so the fix is one `azd env set`. Nothing here changes any resource.
# Skipped when an existing Azure OpenAI endpoint is used (no deployment is created), or with
# AZURE_OPENAI_SKIP_MODEL_CHECK=true.
set -eu

HOOK=preprovision
# shellcheck source=azd_env.sh
. "$(dirname "$0")/azd_env.sh"

load_azd_env AZURE_LOCATION AZURE_OPENAI_LOCATION AZURE_SUBSCRIPTION_ID \
    AZURE_OPENAI_EXISTING_ENDPOINT AZURE_OPENAI_MODEL AZURE_OPENAI_MODEL_VERSION \
    AZURE_OPENAI_DEPLOYMENT_SKU AZURE_OPENAI_DEPLOY_FALLBACK AZURE_OPENAI_FALLBACK_MODEL \
    AZURE_OPENAI_FALLBACK_MODEL_VERSION AZURE_OPENAI_FALLBACK_SKU AZURE_OPENAI_SKIP_MODEL_CHECK

if [ "${AZURE_OPENAI_SKIP_MODEL_CHECK:-false}" = "true" ]; then
    say "AZURE_OPENAI_SKIP_MODEL_CHECK=true: not checking model availability"
    exit 0
fi
if [ -n "${AZURE_OPENAI_EXISTING_ENDPOINT:-}" ]; then
    say "using the existing endpoint $AZURE_OPENAI_EXISTING_ENDPOINT: no deployment to check"
    exit 0
fi

# Unset: the defaults of infra/main.parameters.json (azd_default).
region=${AZURE_OPENAI_LOCATION:-${AZURE_LOCATION:-}}
model=${AZURE_OPENAI_MODEL:-$(azd_default AZURE_OPENAI_MODEL)}
version=${AZURE_OPENAI_MODEL_VERSION:-$(azd_default AZURE_OPENAI_MODEL_VERSION)}
sku=${AZURE_OPENAI_DEPLOYMENT_SKU:-$(azd_default AZURE_OPENAI_DEPLOYMENT_SKU)}
deploy_fallback=${AZURE_OPENAI_DEPLOY_FALLBACK:-false}
fallback_model=${AZURE_OPENAI_FALLBACK_MODEL:-$(azd_default AZURE_OPENAI_FALLBACK_MODEL)}
fallback_version=${AZURE_OPENAI_FALLBACK_MODEL_VERSION:-$(azd_default AZURE_OPENAI_FALLBACK_MODEL_VERSION)}
fallback_sku=${AZURE_OPENAI_FALLBACK_SKU:-$(azd_default AZURE_OPENAI_FALLBACK_SKU)}

if [ -z "$region" ]; then
    say "no region chosen yet (AZURE_LOCATION / AZURE_OPENAI_LOCATION): not checking model availability"
    exit 0
fi

command -v az >/dev/null 2>&1 || fail "the Azure CLI (az) is required to check model availability: https://learn.microsoft.com/cli/azure/install-azure-cli (or set AZURE_OPENAI_SKIP_MODEL_CHECK=true)"
az account show --output none 2>/dev/null || fail "the Azure CLI is not signed in: run 'az login' (azd and az keep separate sign-ins), or set AZURE_OPENAI_SKIP_MODEL_CHECK=true"
if [ -n "${AZURE_SUBSCRIPTION_ID:-}" ]; then
    az account set --subscription "$AZURE_SUBSCRIPTION_ID" || fail "cannot select subscription $AZURE_SUBSCRIPTION_ID"
fi

# One line per OpenAI model version the region offers: name<TAB>version<TAB>sku@deprecation,...
# (an empty deprecation: the SKU takes new deployments). Shape of the answer:
# https://learn.microsoft.com/rest/api/aiservices/accountmanagement/models/list
query='[?kind==`"OpenAI"`].model.[name, version, join(`","`, skus[].join(`"@"`, [name, deprecationDate || `""`]) || `[]`)]'
offers=$(az cognitiveservices model list --location "$region" --query "$query" --output tsv) ||
    fail "could not list the models offered in $region (az cognitiveservices model list --location $region)"
offers=$(printf '%s\n' "$offers" | tr -d '\r')
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# Prints what the region offers for a SKU (or, when that is nothing, every model version), bounded.
list_offers() {
    printf '%s\n' "$offers" | awk -F '\t' -v sku="$1" '
        NF >= 2 {
            n = split($3, skus, ",")
            for (i = 1; i <= n; i++) {
                split(skus[i], part, "@")
                if (part[1] == sku) print "  " $1 " " $2
            }
        }' | sort -u | head -n 100
}

# check NAME VERSION SKU LABEL: exit with a message when the region does not take that deployment.
check() {
    name=$1
    ver=$2
    want=$3
    label=$4
    # "absent" (no such name+version), "nosku" (version offered, not in this SKU), or the SKU's
    # deprecation date ("" = open).
    verdict=$(printf '%s\n' "$offers" | awk -F '\t' -v name="$name" -v ver="$ver" -v sku="$want" '
        BEGIN { found = 0; result = "absent" }
        $1 == name && $2 == ver {
            found = 1
            if (result == "absent") result = "nosku"
            n = split($3, skus, ",")
            for (i = 1; i <= n; i++) {
                split(skus[i], part, "@")
                if (part[1] == sku) { result = "sku:" part[2] }
            }
        }
        END { print result }')
    case "$verdict" in
    sku:)
        say "$region offers $label $name $ver as $want"
        return 0
        ;;
    sku:*)
        closed=${verdict#sku:}
        if [ "$(printf '%s\n%s\n' "$closed" "$now" | sort | head -n 1)" = "$now" ]; then
            say "$region offers $label $name $ver as $want until $closed"
            return 0
        fi
        problem="$label model $name version $ver takes no new $want deployments in $region since $closed"
        ;;
    nosku)
        problem="$region offers $label model $name version $ver, but not as $want"
        ;;
    *)
        problem="$region does not offer $label model $name version $ver"
        ;;
    esac
    printf 'preprovision: ERROR: %s.\n' "$problem" >&2
    versions=$(printf '%s\n' "$offers" | awk -F '\t' -v name="$name" '$1 == name { print "  " $1 " " $2 " (" $3 ")" }' | head -n 20)
    if [ -n "$versions" ]; then
        printf 'Versions of %s offered in %s (SKU@closing date):\n%s\n' "$name" "$region" "$versions" >&2
    fi
    offered=$(list_offers "$want")
    if [ -n "$offered" ]; then
        printf 'Models offered in %s as %s:\n%s\n' "$region" "$want" "$offered" >&2
    else
        printf 'Nothing is offered in %s as %s.\n' "$region" "$want" >&2
    fi
    printf 'Pick one (shared/model_catalog.json has retirement dates and prices), for example:\n' >&2
    if [ "$label" = "fallback" ]; then
        printf '  azd env set AZURE_OPENAI_FALLBACK_MODEL <name>; azd env set AZURE_OPENAI_FALLBACK_MODEL_VERSION <version>\n' >&2
    else
        printf '  azd env set AZURE_OPENAI_MODEL <name>; azd env set AZURE_OPENAI_MODEL_VERSION <version>\n' >&2
    fi
    printf 'or another region: azd env set AZURE_OPENAI_LOCATION <region>\n' >&2
    exit 1
}

check "$model" "$version" "$sku" "primary"
if [ "$deploy_fallback" = "true" ]; then
    check "$fallback_model" "$fallback_version" "$fallback_sku" "fallback"
fi
