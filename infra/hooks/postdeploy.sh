#!/bin/sh
# azd postdeploy hook: subscribe the blob trigger to BlobCreated events under images/.
#
# The blob trigger uses "source": "EventGrid", so the Functions host only learns of a new blob
# when Event Grid posts to its blobs webhook. That webhook URL carries the host's
# `blobs_extension` system key, which exists only once the deployed host has started, so the
# subscription is made here, after `azd deploy`, rather than in Bicep. Safe to run again:
# `event-subscription create` replaces an existing subscription of the same name.
set -eu

HOOK=postdeploy
# shellcheck source=azd_env.sh
. "$(dirname "$0")/azd_env.sh"

command -v az >/dev/null 2>&1 || fail "the Azure CLI (az) is required: https://learn.microsoft.com/cli/azure/install-azure-cli"
load_azd_env AZURE_FUNCTION_APP_NAME AZURE_FUNCTION_APP_HOSTNAME RESOURCE_GROUP \
    EVENT_GRID_SYSTEM_TOPIC IMAGES_CONTAINER AZURE_SUBSCRIPTION_ID

app=${AZURE_FUNCTION_APP_NAME:-}
rg=${RESOURCE_GROUP:-}
topic=${EVENT_GRID_SYSTEM_TOPIC:-}
container=${IMAGES_CONTAINER:-images}
[ -n "$app" ] || fail "AZURE_FUNCTION_APP_NAME is not set; run 'azd provision' first"
[ -n "$rg" ] || fail "RESOURCE_GROUP is not set; run 'azd provision' first"
[ -n "$topic" ] || fail "EVENT_GRID_SYSTEM_TOPIC is not set; run 'azd provision' first"
host=${AZURE_FUNCTION_APP_HOSTNAME:-$app.azurewebsites.net}
subscription_name="blob-trigger-${container}"

az account show --output none 2>/dev/null || fail "the Azure CLI is not signed in: run 'az login' (azd and az keep separate sign-ins)"
if [ -n "${AZURE_SUBSCRIPTION_ID:-}" ]; then
    az account set --subscription "$AZURE_SUBSCRIPTION_ID" || fail "cannot select subscription $AZURE_SUBSCRIPTION_ID"
fi

# The key appears once the host has started and indexed the blob trigger; a Flex Consumption app
# scales to zero, so wake it (any request will do) and wait.
attempts=${POSTDEPLOY_KEY_ATTEMPTS:-18}
delay=${POSTDEPLOY_KEY_DELAY_S:-10}
key=""
i=1
while [ "$i" -le "$attempts" ]; do
    if command -v curl >/dev/null 2>&1; then
        curl --silent --output /dev/null --max-time 30 "https://$host/" || true
    fi
    key=$(az functionapp keys list --name "$app" --resource-group "$rg" \
        --query "systemKeys.blobs_extension" --output tsv 2>/dev/null || true)
    [ -n "$key" ] && break
    say "waiting for the Functions host on $app to create the blobs_extension key ($i/$attempts)..."
    sleep "$delay"
    i=$((i + 1))
done
[ -n "$key" ] || fail "no blobs_extension system key on $app after $attempts attempts. Check that the deployment succeeded and the host started (Application Insights, or 'az functionapp function list -n $app -g $rg'), then run this hook again: azd hooks run postdeploy"

endpoint="https://$host/runtime/webhooks/blobs?functionName=Host.Functions.blob_trigger&code=$key"

if az eventgrid system-topic event-subscription show --name "$subscription_name" \
    --resource-group "$rg" --system-topic-name "$topic" --output none 2>/dev/null; then
    action="updated"
else
    action="created"
fi

say "subscribing blob_trigger to Microsoft.Storage.BlobCreated under $container/ (system topic $topic)..."
# Event Grid validates the webhook during this call (the blobs extension answers the handshake).
az eventgrid system-topic event-subscription create \
    --name "$subscription_name" \
    --resource-group "$rg" \
    --system-topic-name "$topic" \
    --endpoint-type webhook \
    --endpoint "$endpoint" \
    --included-event-types Microsoft.Storage.BlobCreated \
    --subject-begins-with "/blobServices/default/containers/$container/" \
    --event-delivery-schema eventgridschema \
    --max-delivery-attempts 30 \
    --event-ttl 1440 \
    --output none ||
    fail "could not create the Event Grid subscription $subscription_name; see https://aka.ms/esvalidation if the webhook validation failed"

say "Event Grid subscription $subscription_name $action: drop files into the '$container' container; results appear in 'results'."
