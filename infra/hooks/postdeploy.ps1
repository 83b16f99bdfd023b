# azd postdeploy hook: subscribe the blob trigger to BlobCreated events under images/.
#
# The blob trigger uses "source": "EventGrid", so the Functions host only learns of a new blob
# when Event Grid posts to its blobs webhook. That webhook URL carries the host's
# `blobs_extension` system key, which exists only once the deployed host has started, so the
# subscription is made here, after `azd deploy`, rather than in Bicep. Safe to run again: the
# subscription is written with a PUT, which creates or replaces it.
#
# Unlike postdeploy.sh this uses `az rest` with the body in a file: on Windows `az` is a .cmd
# script, and cmd.exe splits a webhook URL at its '&' (Azure/azure-cli#28286).
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

function Say([string]$message) { Write-Host "postdeploy: $message" }
function Fail([string]$message) {
    Write-Host "postdeploy: ERROR: $message" -ForegroundColor Red
    exit 1
}

# azd exports its environment to hooks; when run by hand, read it from `azd env get-values`.
$needed = @('AZURE_FUNCTION_APP_NAME', 'AZURE_FUNCTION_APP_HOSTNAME', 'RESOURCE_GROUP', 'EVENT_GRID_SYSTEM_TOPIC', 'IMAGES_CONTAINER', 'AZURE_SUBSCRIPTION_ID')
if (Get-Command azd -ErrorAction SilentlyContinue) {
    $values = azd env get-values 2>$null
    if ($LASTEXITCODE -eq 0 -and $values) {
        foreach ($line in $values) {
            if ($line -match '^([A-Za-z_][A-Za-z0-9_]*)="?(.*?)"?$') {
                $key = $Matches[1]
                if ($needed -contains $key -and -not [Environment]::GetEnvironmentVariable($key)) {
                    [Environment]::SetEnvironmentVariable($key, $Matches[2])
                }
            }
        }
    }
}

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Fail 'the Azure CLI (az) is required: https://learn.microsoft.com/cli/azure/install-azure-cli'
}

$app = $env:AZURE_FUNCTION_APP_NAME
$rg = $env:RESOURCE_GROUP
$topic = $env:EVENT_GRID_SYSTEM_TOPIC
$container = if ($env:IMAGES_CONTAINER) { $env:IMAGES_CONTAINER } else { 'images' }
if (-not $app) { Fail "AZURE_FUNCTION_APP_NAME is not set; run 'azd provision' first" }
if (-not $rg) { Fail "RESOURCE_GROUP is not set; run 'azd provision' first" }
if (-not $topic) { Fail "EVENT_GRID_SYSTEM_TOPIC is not set; run 'azd provision' first" }
$hostName = if ($env:AZURE_FUNCTION_APP_HOSTNAME) { $env:AZURE_FUNCTION_APP_HOSTNAME } else { "$app.azurewebsites.net" }
$subscriptionName = "blob-trigger-$container"

az account show --output none 2>$null
if ($LASTEXITCODE -ne 0) { Fail "the Azure CLI is not signed in: run 'az login' (azd and az keep separate sign-ins)" }
if ($env:AZURE_SUBSCRIPTION_ID) {
    az account set --subscription $env:AZURE_SUBSCRIPTION_ID
    if ($LASTEXITCODE -ne 0) { Fail "cannot select subscription $($env:AZURE_SUBSCRIPTION_ID)" }
}
$subscriptionId = az account show --query id --output tsv

# The key appears once the host has started and indexed the blob trigger; a Flex Consumption app
# scales to zero, so wake it (any request will do) and wait.
$attempts = if ($env:POSTDEPLOY_KEY_ATTEMPTS) { [int]$env:POSTDEPLOY_KEY_ATTEMPTS } else { 18 }
$delay = if ($env:POSTDEPLOY_KEY_DELAY_S) { [int]$env:POSTDEPLOY_KEY_DELAY_S } else { 10 }
$key = ''
for ($i = 1; $i -le $attempts; $i++) {
    try { Invoke-WebRequest -Uri "https://$hostName/" -Method Get -TimeoutSec 30 -UseBasicParsing | Out-Null } catch { }
    $key = az functionapp keys list --name $app --resource-group $rg --query 'systemKeys.blobs_extension' --output tsv 2>$null
    if ($LASTEXITCODE -eq 0 -and $key) { break }
    $key = ''
    Say "waiting for the Functions host on $app to create the blobs_extension key ($i/$attempts)..."
    Start-Sleep -Seconds $delay
}
if (-not $key) {
    Fail "no blobs_extension system key on $app after $attempts attempts. Check that the deployment succeeded and the host started (Application Insights, or 'az functionapp function list -n $app -g $rg'), then run this hook again: azd hooks run postdeploy"
}

$endpoint = "https://$hostName/runtime/webhooks/blobs?functionName=Host.Functions.blob_trigger&code=$key"
$resourceUrl = "/subscriptions/$subscriptionId/resourceGroups/$rg/providers/Microsoft.EventGrid/systemTopics/$topic/eventSubscriptions/${subscriptionName}?api-version=2025-02-15"

az eventgrid system-topic event-subscription show --name $subscriptionName --resource-group $rg --system-topic-name $topic --output none 2>$null
$action = if ($LASTEXITCODE -eq 0) { 'updated' } else { 'created' }

$body = @{
    properties = @{
        destination         = @{
            endpointType = 'WebHook'
            properties   = @{ endpointUrl = $endpoint }
        }
        filter              = @{
            includedEventTypes = @('Microsoft.Storage.BlobCreated')
            subjectBeginsWith  = "/blobServices/default/containers/$container/"
        }
        eventDeliverySchema = 'EventGridSchema'
        retryPolicy         = @{ maxDeliveryAttempts = 30; eventTimeToLiveInMinutes = 1440 }
    }
} | ConvertTo-Json -Depth 10
$bodyFile = New-TemporaryFile
try {
    [System.IO.File]::WriteAllText($bodyFile.FullName, $body)  # UTF-8 without BOM
    Say "subscribing blob_trigger to Microsoft.Storage.BlobCreated under $container/ (system topic $topic)..."
    az rest --method put --url $resourceUrl --body "@$($bodyFile.FullName)" --headers 'Content-Type=application/json' --output none
    if ($LASTEXITCODE -ne 0) { Fail "could not write the Event Grid subscription $subscriptionName" }
}
finally {
    Remove-Item -Path $bodyFile -ErrorAction SilentlyContinue
}

# The PUT returns before Event Grid has validated the webhook; wait for the outcome.
$state = ''
for ($i = 1; $i -le 30; $i++) {
    $state = az eventgrid system-topic event-subscription show --name $subscriptionName --resource-group $rg --system-topic-name $topic --query provisioningState --output tsv 2>$null
    if ($state -in @('Succeeded', 'Failed', 'Canceled')) { break }
    Start-Sleep -Seconds 5
}
if ($state -ne 'Succeeded') {
    Fail "Event Grid subscription $subscriptionName ended in state '$state'; see https://aka.ms/esvalidation if the webhook validation failed"
}

Say "Event Grid subscription $subscriptionName ${action}: drop files into the '$container' container; results appear in 'results'."
