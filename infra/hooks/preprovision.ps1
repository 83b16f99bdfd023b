# azd preprovision hook: stop before provisioning if the chosen region does not offer the chosen
# model, version and deployment SKU (primary, and the fallback when one is deployed).
#
# Models retire every few months (shared/model_catalog.json); a deployment of a model the region
# no longer offers fails deep inside `azd provision` with a terse ARM error. This asks the region
# first, with `az cognitiveservices model list --location <region>`, and when the choice is not
# offered it lists what is, so the fix is one `azd env set`. Nothing here changes any resource.
# Skipped when an existing Azure OpenAI endpoint is used (no deployment is created), or with
# AZURE_OPENAI_SKIP_MODEL_CHECK=true.
#
# Unlike preprovision.sh this filters the JSON answer in PowerShell instead of passing a JMESPath
# --query: on Windows `az` is a .cmd script and cmd.exe would split the query at its '|'.
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

function Say([string]$message) { Write-Host "preprovision: $message" }
function Fail([string]$message) {
    Write-Host "preprovision: ERROR: $message" -ForegroundColor Red
    exit 1
}

# azd exports its environment to hooks; when run by hand, read it from `azd env get-values`.
$needed = @(
    'AZURE_LOCATION', 'AZURE_OPENAI_LOCATION', 'AZURE_SUBSCRIPTION_ID', 'AZURE_OPENAI_EXISTING_ENDPOINT',
    'AZURE_OPENAI_MODEL', 'AZURE_OPENAI_MODEL_VERSION', 'AZURE_OPENAI_DEPLOYMENT_SKU',
    'AZURE_OPENAI_DEPLOY_FALLBACK', 'AZURE_OPENAI_FALLBACK_MODEL', 'AZURE_OPENAI_FALLBACK_MODEL_VERSION',
    'AZURE_OPENAI_FALLBACK_SKU', 'AZURE_OPENAI_SKIP_MODEL_CHECK'
)
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

function Setting([string]$name, [string]$default) {
    $value = [Environment]::GetEnvironmentVariable($name)
    if ($value) { return $value } else { return $default }
}

if ((Setting 'AZURE_OPENAI_SKIP_MODEL_CHECK' 'false') -eq 'true') {
    Say 'AZURE_OPENAI_SKIP_MODEL_CHECK=true: not checking model availability'
    exit 0
}
if ($env:AZURE_OPENAI_EXISTING_ENDPOINT) {
    Say "using the existing endpoint $($env:AZURE_OPENAI_EXISTING_ENDPOINT): no deployment to check"
    exit 0
}

# The same defaults as infra/main.parameters.json (tests/test_infra.py keeps them equal).
$region = Setting 'AZURE_OPENAI_LOCATION' (Setting 'AZURE_LOCATION' '')
$model = Setting 'AZURE_OPENAI_MODEL' 'gpt-5.4-mini'
$version = Setting 'AZURE_OPENAI_MODEL_VERSION' '2026-03-17'
$sku = Setting 'AZURE_OPENAI_DEPLOYMENT_SKU' 'GlobalStandard'
$deployFallback = Setting 'AZURE_OPENAI_DEPLOY_FALLBACK' 'false'
$fallbackModel = Setting 'AZURE_OPENAI_FALLBACK_MODEL' 'gpt-5.4-nano'
$fallbackVersion = Setting 'AZURE_OPENAI_FALLBACK_MODEL_VERSION' '2026-03-17'
$fallbackSku = Setting 'AZURE_OPENAI_FALLBACK_SKU' 'GlobalStandard'

if (-not $region) {
    Say 'no region chosen yet (AZURE_LOCATION / AZURE_OPENAI_LOCATION): not checking model availability'
    exit 0
}

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    Fail 'the Azure CLI (az) is required to check model availability: https://learn.microsoft.com/cli/azure/install-azure-cli (or set AZURE_OPENAI_SKIP_MODEL_CHECK=true)'
}
az account show --output none 2>$null
if ($LASTEXITCODE -ne 0) { Fail "the Azure CLI is not signed in: run 'az login' (azd and az keep separate sign-ins), or set AZURE_OPENAI_SKIP_MODEL_CHECK=true" }
if ($env:AZURE_SUBSCRIPTION_ID) {
    az account set --subscription $env:AZURE_SUBSCRIPTION_ID
    if ($LASTEXITCODE -ne 0) { Fail "cannot select subscription $($env:AZURE_SUBSCRIPTION_ID)" }
}

# Shape of the answer: https://learn.microsoft.com/rest/api/aiservices/accountmanagement/models/list
$raw = az cognitiveservices model list --location $region --output json
if ($LASTEXITCODE -ne 0) { Fail "could not list the models offered in $region (az cognitiveservices model list --location $region)" }
# ForEach-Object unrolls the array whether ConvertFrom-Json emits it whole (5.1) or item by item (7).
$offers = @(($raw -join "`n") | ConvertFrom-Json | ForEach-Object { $_ } | Where-Object {
        $_.PSObject.Properties['kind'] -and $_.kind -eq 'OpenAI' -and $_.PSObject.Properties['model'] -and $_.model
    })
$now = [DateTimeOffset]::UtcNow

function SkusOf($offer) {
    if ($offer.model.PSObject.Properties['skus'] -and $offer.model.skus) { return @($offer.model.skus) }
    return @()
}

function ClosingDate($skuEntry) {
    if ($skuEntry.PSObject.Properties['deprecationDate'] -and $skuEntry.deprecationDate) {
        $value = $skuEntry.deprecationDate
        # PowerShell 7's ConvertFrom-Json turns ISO 8601 strings into DateTime already.
        if ($value -is [DateTime]) { return [DateTimeOffset]::new($value.ToUniversalTime()) }
        return [DateTimeOffset]::Parse([string]$value, [Globalization.CultureInfo]::InvariantCulture)
    }
    return $null
}

function Check([string]$name, [string]$ver, [string]$want, [string]$label) {
    $matching = @($offers | Where-Object { $_.model.name -eq $name -and $_.model.version -eq $ver })
    $problem = $null
    if ($matching.Count -eq 0) {
        $problem = "$region does not offer $label model $name version $ver"
    }
    else {
        $entry = @($matching | ForEach-Object { SkusOf $_ } | Where-Object { $_.name -eq $want }) | Select-Object -First 1
        if (-not $entry) {
            $problem = "$region offers $label model $name version $ver, but not as $want"
        }
        else {
            $closed = ClosingDate $entry
            if ($null -eq $closed) { Say "$region offers $label $name $ver as $want"; return }
            if ($closed -gt $now) { Say "$region offers $label $name $ver as $want until $($closed.ToString('u'))"; return }
            $problem = "$label model $name version $ver takes no new $want deployments in $region since $($closed.ToString('u'))"
        }
    }
    Write-Host "preprovision: ERROR: $problem." -ForegroundColor Red
    $versions = @($offers | Where-Object { $_.model.name -eq $name } | Select-Object -First 20 | ForEach-Object {
            "  $($_.model.name) $($_.model.version) ($((@(SkusOf $_) | ForEach-Object { $_.name }) -join ','))"
        })
    if ($versions.Count -gt 0) { Write-Host "Versions of $name offered in ${region}:"; $versions | ForEach-Object { Write-Host $_ } }
    $offered = @($offers | Where-Object { @(SkusOf $_ | Where-Object { $_.name -eq $want }).Count -gt 0 } |
            ForEach-Object { "  $($_.model.name) $($_.model.version)" } | Sort-Object -Unique | Select-Object -First 100)
    if ($offered.Count -gt 0) { Write-Host "Models offered in $region as ${want}:"; $offered | ForEach-Object { Write-Host $_ } }
    else { Write-Host "Nothing is offered in $region as $want." }
    Write-Host 'Pick one (shared/model_catalog.json has retirement dates and prices), for example:'
    if ($label -eq 'fallback') {
        Write-Host '  azd env set AZURE_OPENAI_FALLBACK_MODEL <name>; azd env set AZURE_OPENAI_FALLBACK_MODEL_VERSION <version>'
    }
    else {
        Write-Host '  azd env set AZURE_OPENAI_MODEL <name>; azd env set AZURE_OPENAI_MODEL_VERSION <version>'
    }
    Write-Host 'or another region: azd env set AZURE_OPENAI_LOCATION <region>'
    exit 1
}

Check $model $version $sku 'primary'
if ($deployFallback -eq 'true') {
    Check $fallbackModel $fallbackVersion $fallbackSku 'fallback'
}
