// vlm-functions on Azure: `azd up` provisions everything below, deploys the app, then
// infra/hooks/postdeploy.* subscribes the blob trigger to Event Grid.
//
//   resource group
//   ├─ user-assigned identity ── the only credential the app has (no keys, no connection strings)
//   ├─ storage account ── images/ results/ cache/ schemas/ + deployment package; lifecycle rule on cache/
//   ├─ Event Grid system topic on the storage account (subscription: postdeploy hook)
//   ├─ Log Analytics + Application Insights (Entra ID ingestion only), a workbook and two alert rules
//   ├─ Flex Consumption plan (FC1) + function app (Python 3.11)
//   ├─ Azure OpenAI account + gpt-5.4-mini deployment (+ optional fallback), unless an existing endpoint is given
//   └─ optional (useApim): API Management as an AI gateway in front of Azure OpenAI; VLM_ENDPOINT
//      then points at the gateway (infra/modules/apim.bicep, policy in infra/apim/policy.xml)
//
// Plain `resource` declarations only (no registry modules), so it builds without network access.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; used for the resource group name and the resource token.')
param environmentName string

@minLength(1)
@description('Region for all resources (must offer the Flex Consumption plan).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group name; default rg-<environmentName>.')
param resourceGroupName string = ''

@description('Object id of the principal running azd (AZURE_PRINCIPAL_ID); gets data access when grantPrincipalDataAccess is true.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('Grant the deploying principal blob/queue data and Azure OpenAI access, so local tools and tests can use the deployed resources.')
param grantPrincipalDataAccess bool = true

// ---- Function app ----

@allowed([
  512
  2048
  4096
])
@description('Memory of each Flex Consumption instance (image decoding and PDF rendering want 2048 or more).')
param instanceMemoryMB int = 2048

@minValue(40)
@maxValue(1000)
@description('Upper bound on Flex Consumption instances.')
param maximumInstanceCount int = 40

@minValue(0)
@description('Client-side requests-per-minute bound per instance (VLM_RPM); 0 = the capacity of the deployment this template creates (6 RPM per 1000 TPM, as Azure allots it), or, with an existing endpoint, off until the service names its limit.')
param vlmRpm int = 0

@minValue(0)
@description('Client-side tokens-per-minute bound per instance (VLM_TPM); 0 = the capacity of the deployment this template creates, or, with an existing endpoint, off until the service names its limit.')
param vlmTpm int = 0

@minValue(0)
@maxValue(1000)
@description('Split the quota evenly and fixed among this many instances (VLM_RATE_SPLIT): set it to maximumInstanceCount when the instance count is pinned and instances added under load must get their part at once; 0 = each instance learns its share from the service.')
param vlmRateSplit int = 0

@allowed([
  'storage'
  'off'
])
@description('How instances share the quota (VLM_RATE_PEERS): storage = each busy instance counts itself with a small blob in the cache container (one write and one list per 2-10 s) and paces to 1/N of the quota; off = each learns a share from the rate-limit headers alone. A vlmRateSplit above 0 takes precedence.')
param vlmRatePeers string = 'storage'

// ---- Monitoring ----

@description('Action group resource id the alerts (sustained 429s, poison records) notify; empty: they show in the portal only.')
param alertActionGroupId string = ''

// ---- Storage ----

@minValue(1)
@description('Days after which blobs in the cache container are deleted by the lifecycle rule (CACHE_TTL_DAYS).')
param cacheTtlDays int = 30

// ---- Azure OpenAI ----

@description('Use this existing Azure OpenAI endpoint (https://NAME.openai.azure.com) instead of creating an account. The app identity needs "Cognitive Services OpenAI User" on it: pass existingOpenAiResourceId to have this template grant it, or grant it yourself.')
param existingOpenAiEndpoint string = ''

@description('Resource id of the existing Azure OpenAI account behind existingOpenAiEndpoint; when set, the role assignment is made there (needs permission to assign roles on it).')
param existingOpenAiResourceId string = ''

@description('Region for a new Azure OpenAI account; default: location. Pick one that offers the model (the preprovision hook checks) and has quota.')
param openAiLocation string = ''

param openAiSkuName string = 'S0'

// The default model is one a new customer can deploy today. Checked 2026-11-30 against
// Azure's model retirement schedule (gpt-5.4-mini 2026-03-17: GA, retires 2027-03-18)
// https://learn.microsoft.com/azure/foundry/openai/concepts/model-retirement-schedule
// and the Global Standard availability matrix (offered in every listed Global Standard region)
// https://learn.microsoft.com/azure/foundry/foundry-models/concepts/models-sold-directly-by-azure
// The former default, gpt-4o 2024-11-20, retired on 2026-10-01. shared/model_catalog.json holds
// the dates; tests/test_infra.py fails once a default here is past its retirement date there.
// infra/hooks/preprovision.* check that the region offers the model, version and SKU.
@description('Deployment name the app calls (VLM_DEPLOYMENT). With an existing endpoint it must already exist there.')
param openAiDeploymentName string = 'gpt-5.4-mini'
@description('Model of that deployment (VLM_MODEL), as `az cognitiveservices model list` names it. With an existing endpoint: the model behind it, or empty to let the app learn it from the first answer.')
param openAiModelName string = 'gpt-5.4-mini'
@description('Model version, as `az cognitiveservices model list` shows it.')
param openAiModelVersion string = '2026-03-17'
@description('Deployment SKU: GlobalStandard, DataZoneStandard, Standard, ...')
param openAiDeploymentSkuName string = 'GlobalStandard'
@minValue(1)
@description('Deployment capacity in thousands of tokens per minute.')
param openAiDeploymentCapacity int = 30

@description('Use a fallback deployment (VLM_FALLBACK_DEPLOYMENTS), tried when the primary is throttled or down. Created on a new account; with an existing endpoint it must already exist there.')
param deployFallback bool = false
param fallbackDeploymentName string = 'gpt-5.4-nano'
@description('Model of the fallback deployment; the app learns it as VLM_FALLBACK_DEPLOYMENTS=<deployment>=<model>.')
param fallbackModelName string = 'gpt-5.4-nano'
param fallbackModelVersion string = '2026-03-17'
param fallbackDeploymentSkuName string = 'GlobalStandard'
@minValue(1)
param fallbackDeploymentCapacity int = 30

// Global Batch (issue 13, docs/batch.md): a GlobalBatch deployment of the same model takes folders
// in `"mode": "batch"` at 50% of the Global Standard price, answered within a 24-hour target, with
// its own enqueued-token quota that leaves the online deployment's TPM alone.
// https://learn.microsoft.com/azure/ai-foundry/openai/how-to/batch
@description('Create a GlobalBatch deployment of the primary model (VLM_BATCH_DEPLOYMENT) for folders in batch mode. Created on a new account; with an existing endpoint it must already exist there.')
param deployBatch bool = false
param batchDeploymentName string = 'gpt-5.4-mini-batch'
@description('Deployment SKU of the batch deployment: GlobalBatch (or DataZoneBatch for data-zone residency).')
@allowed([
  'GlobalBatch'
  'DataZoneBatch'
])
param batchDeploymentSkuName string = 'GlobalBatch'
@minValue(1)
@description('Batch deployment capacity: its enqueued-token quota (the tokens of all jobs queued or running at once); see docs/batch.md for the unit. Also sets BATCH_ENQUEUED_TOKENS.')
param batchDeploymentCapacity int = 50
@description('NCRONTAB schedule of the batch_submit timer function (seals pending requests into batch jobs).')
param batchSubmitSchedule string = '0 */5 * * * *'
@description('NCRONTAB schedule of the batch_collect timer function (polls jobs, writes their records).')
param batchCollectSchedule string = '30 */5 * * * *'

// ---- Optional AI gateway (README: "API Management gateway") ----

@description('Put Azure API Management in front of Azure OpenAI: one token budget shared by every instance (and every app behind it), a backend pool with circuit breakers, managed identity from APIM to Azure OpenAI. VLM_ENDPOINT becomes the gateway URL.')
param useApim bool = false
@allowed([
  'Developer'
  'BasicV2'
  'StandardV2'
  'PremiumV2'
  'Standard'
  'Premium'
])
param apimSkuName string = 'BasicV2'
@description('Publisher e-mail API Management requires (notifications); default: a placeholder.')
param apimPublisherEmail string = ''
@minValue(0)
@description('Tokens per minute the gateway lets the whole app spend over all instances; 0 = the primary deployment\'s capacity (openAiDeploymentCapacity x 1000).')
param apimTokensPerMinute int = 0
@description('More Azure OpenAI endpoints (other regions or accounts, each with the same deployment names) for the gateway\'s backend pool, after the primary. Grant the gateway identity (output APIM_PRINCIPAL_ID) "Cognitive Services OpenAI User" on each.')
param apimExtraOpenAiEndpoints array = []

var abbrs = loadJsonContent('./abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}

// Container names: the contract in DESIGN.md (and the defaults in shared/settings.py).
var imagesContainerName = 'images'
var resultsContainerName = 'results'
var cacheContainerName = 'cache'
var schemasContainerName = 'schemas'

var functionAppName = '${abbrs.webSitesFunctions}${resourceToken}'
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var eventGridSystemTopicName = '${abbrs.eventGridSystemTopics}${resourceToken}'

var createOpenAi = empty(existingOpenAiEndpoint)
var vlmBatchDeployment = deployBatch ? batchDeploymentName : ''
var userPrincipalId = grantPrincipalDataAccess ? principalId : ''
// `deployment=model` (CONTRACTS C3): the app prices and parameterises the fallback by its model.
var vlmFallbackDeployments = deployFallback ? (empty(fallbackModelName) ? fallbackDeploymentName : '${fallbackDeploymentName}=${fallbackModelName}') : ''

// An existing account is addressed by its resource id: /subscriptions/S/resourceGroups/G/providers/Microsoft.CognitiveServices/accounts/N
var existingOpenAiIdParts = split(existingOpenAiResourceId, '/')
var grantOnExistingOpenAi = !createOpenAi && !empty(existingOpenAiResourceId)
var existingOpenAiSubscriptionId = grantOnExistingOpenAi ? existingOpenAiIdParts[2] : subscription().subscriptionId
var existingOpenAiResourceGroup = grantOnExistingOpenAi ? existingOpenAiIdParts[4] : rg.name
var existingOpenAiAccountName = grantOnExistingOpenAi ? last(existingOpenAiIdParts) : ''

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    containerNames: [
      imagesContainerName
      resultsContainerName
      cacheContainerName
      schemasContainerName
      deploymentContainerName
    ]
    cacheContainerName: cacheContainerName
    cacheTtlDays: cacheTtlDays
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
  }
}

// The workbook (tokens, cost, 429 rate, latency, cache hits, poison) and the two alert rules.
module monitoringWorkbook 'modules/monitoring-workbook.bicep' = {
  name: 'monitoring-workbook'
  scope: rg
  params: {
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    location: location
    tags: tags
    actionGroupIds: empty(alertActionGroupId) ? [] : [
      alertActionGroupId
    ]
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: userPrincipalId
    userPrincipalType: principalType
  }
}

module openAi 'modules/openai.bicep' = if (createOpenAi) {
  name: 'openai'
  scope: rg
  params: {
    name: '${abbrs.cognitiveServicesAccounts}${resourceToken}'
    location: !empty(openAiLocation) ? openAiLocation : location
    tags: tags
    skuName: openAiSkuName
    deploymentName: openAiDeploymentName
    modelName: openAiModelName
    modelVersion: openAiModelVersion
    deploymentSkuName: openAiDeploymentSkuName
    deploymentCapacity: openAiDeploymentCapacity
    deployFallback: deployFallback
    fallbackDeploymentName: fallbackDeploymentName
    fallbackModelName: fallbackModelName
    fallbackModelVersion: fallbackModelVersion
    fallbackSkuName: fallbackDeploymentSkuName
    fallbackCapacity: fallbackDeploymentCapacity
    deployBatch: deployBatch
    batchDeploymentName: batchDeploymentName
    batchSkuName: batchDeploymentSkuName
    batchCapacity: batchDeploymentCapacity
  }
}

module openAiAccess 'modules/openai-access.bicep' = if (createOpenAi) {
  name: 'openai-access'
  scope: rg
  params: {
    accountName: createOpenAi ? openAi.outputs.name : ''
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: userPrincipalId
    userPrincipalType: principalType
  }
}

module existingOpenAiAccess 'modules/openai-access.bicep' = if (grantOnExistingOpenAi) {
  name: 'existing-openai-access'
  scope: resourceGroup(existingOpenAiSubscriptionId, existingOpenAiResourceGroup)
  params: {
    accountName: existingOpenAiAccountName
    identityPrincipalId: identity.outputs.principalId
    userPrincipalId: userPrincipalId
    userPrincipalType: principalType
  }
}

var openAiEndpoint = createOpenAi ? openAi.outputs.endpoint : existingOpenAiEndpoint

module apim 'modules/apim.bicep' = if (useApim) {
  name: 'apim'
  scope: rg
  params: {
    name: '${abbrs.apiManagementService}${resourceToken}'
    location: location
    tags: tags
    skuName: apimSkuName
    publisherEmail: !empty(apimPublisherEmail) ? apimPublisherEmail : 'vlm-functions@example.com'
    publisherName: 'vlm-functions (${environmentName})'
    tenantId: tenant().tenantId
    appClientId: identity.outputs.clientId
    openAiEndpoints: concat([openAiEndpoint], apimExtraOpenAiEndpoints)
    tokensPerMinute: apimTokensPerMinute > 0 ? apimTokensPerMinute : openAiDeploymentCapacity * 1000
  }
}

// The gateway's own identity calls Azure OpenAI: "Cognitive Services OpenAI User" on the account.
module apimOpenAiAccess 'modules/openai-access.bicep' = if (useApim && createOpenAi) {
  name: 'apim-openai-access'
  scope: rg
  params: {
    accountName: createOpenAi ? openAi.outputs.name : ''
    identityPrincipalId: useApim ? apim.outputs.principalId : ''
  }
}

module apimExistingOpenAiAccess 'modules/openai-access.bicep' = if (useApim && grantOnExistingOpenAi) {
  name: 'apim-existing-openai-access'
  scope: resourceGroup(existingOpenAiSubscriptionId, existingOpenAiResourceGroup)
  params: {
    accountName: existingOpenAiAccountName
    identityPrincipalId: useApim ? apim.outputs.principalId : ''
  }
}

// The app calls the gateway when there is one, with the same Entra token (the policy validates it).
var vlmEndpoint = useApim ? apim.outputs.gatewayUrl : openAiEndpoint

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    serviceName: 'api'
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageBlobEndpoint: storage.outputs.blobEndpoint
    storageQueueEndpoint: storage.outputs.queueEndpoint
    deploymentContainerName: deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    vlmEndpoint: vlmEndpoint
    vlmDeployment: openAiDeploymentName
    vlmModel: openAiModelName
    vlmFallbackDeployments: vlmFallbackDeployments
    vlmBatchDeployment: vlmBatchDeployment
    batchEnqueuedTokens: batchDeploymentCapacity * 1000
    batchSubmitSchedule: batchSubmitSchedule
    batchCollectSchedule: batchCollectSchedule
    // Azure OpenAI's chat answers carry x-ratelimit-remaining-* but not always the limit itself, so the
    // limiter is given the deployment's quota rather than left to learn it (README, "Settings").
    vlmRpm: vlmRpm > 0 || !createOpenAi ? vlmRpm : openAiDeploymentCapacity * 6
    vlmTpm: vlmTpm > 0 || !createOpenAi ? vlmTpm : openAiDeploymentCapacity * 1000
    vlmRateSplit: vlmRateSplit
    vlmRatePeers: vlmRatePeers
    imagesContainerName: imagesContainerName
    resultsContainerName: resultsContainerName
    cacheContainerName: cacheContainerName
    schemasContainerName: schemasContainerName
  }
  // The host starts as soon as the app exists: let it find its storage roles in place.
  dependsOn: [
    rbac
  ]
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  scope: rg
  params: {
    name: eventGridSystemTopicName
    location: location
    tags: tags
    storageAccountId: storage.outputs.id
    identityId: identity.outputs.id
  }
}

// Read by azd (SERVICE_API_*, AZURE_*) and by infra/hooks/postdeploy.*. No secrets here.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP string = rg.name
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output AZURE_FUNCTION_APP_HOSTNAME string = functionApp.outputs.defaultHostName
output SERVICE_API_NAME string = functionApp.outputs.name
output SERVICE_API_URI string = 'https://${functionApp.outputs.defaultHostName}'
output AZURE_MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_MANAGED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_STORAGE_BLOB_ENDPOINT string = storage.outputs.blobEndpoint
output IMAGES_CONTAINER string = imagesContainerName
output RESULTS_CONTAINER string = resultsContainerName
output EVENT_GRID_SYSTEM_TOPIC string = eventGrid.outputs.name
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output AZURE_OPENAI_ACCOUNT_NAME string = createOpenAi ? openAi.outputs.name : ''
output VLM_ENDPOINT string = vlmEndpoint
output AZURE_OPENAI_ENDPOINT string = openAiEndpoint
output APIM_NAME string = useApim ? apim.outputs.name : ''
output APIM_GATEWAY_URL string = useApim ? apim.outputs.gatewayUrl : ''
output APIM_PRINCIPAL_ID string = useApim ? apim.outputs.principalId : ''
output VLM_DEPLOYMENT string = openAiDeploymentName
output VLM_MODEL string = openAiModelName
output VLM_FALLBACK_DEPLOYMENTS string = vlmFallbackDeployments
output VLM_BATCH_DEPLOYMENT string = vlmBatchDeployment
