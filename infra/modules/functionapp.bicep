// Flex Consumption plan (FC1) and the Python 3.11 function app. Runtime, scale and deployment
// storage live in functionAppConfig: none of the app settings Flex Consumption removed
// (FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION, WEBSITE_RUN_FROM_PACKAGE,
// WEBSITE_CONTENTSHARE, WEBSITE_CONTENTAZUREFILECONNECTIONSTRING, ...) is set.
// Every connection is identity-based with the user-assigned identity; there is no key anywhere.
param name string
param planName string
param location string
param tags object = {}

@description('azd deploys the `api` service of azure.yaml to the resource with this tag value.')
param serviceName string = 'api'

param identityId string
param identityClientId string

param storageBlobEndpoint string
param storageQueueEndpoint string
param deploymentContainerName string
param applicationInsightsName string

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048
@minValue(40)
@maxValue(1000)
@description('Upper bound on instances (40 is the lowest value Flex Consumption accepts).')
param maximumInstanceCount int = 40

param vlmEndpoint string
param vlmDeployment string
@description('Model behind vlmDeployment (VLM_MODEL); empty: the app learns it from the first answer.')
param vlmModel string = ''
@description('Comma list of fallback deployments; empty for none.')
param vlmFallbackDeployments string = ''
@description('GlobalBatch deployment for folders in batch mode (VLM_BATCH_DEPLOYMENT); empty: batch mode is off.')
param vlmBatchDeployment string = ''
@description('The batch deployment\'s enqueued-token quota in tokens (BATCH_ENQUEUED_TOKENS); 0: unknown.')
param batchEnqueuedTokens int = 0
@description('NCRONTAB schedules of the batch_submit and batch_collect timer functions.')
param batchSubmitSchedule string = '0 */5 * * * *'
param batchCollectSchedule string = '30 */5 * * * *'
param vlmRpm int = 0
param vlmTpm int = 0
param vlmRateSplit int = 0
param vlmRatePeers string = 'storage'

param imagesContainerName string
param resultsContainerName string
param cacheContainerName string
param schemasContainerName string

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

var baseAppSettings = {
  // Functions host storage (keys, leases, the blob trigger's queues), identity-based.
  AzureWebJobsStorage__blobServiceUri: storageBlobEndpoint
  AzureWebJobsStorage__queueServiceUri: storageQueueEndpoint
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identityClientId
  // The VlmStorage connection: shared/settings.py and the blob trigger / poison queue bindings.
  VlmStorage__blobServiceUri: storageBlobEndpoint
  VlmStorage__queueServiceUri: storageQueueEndpoint
  VlmStorage__credential: 'managedidentity'
  VlmStorage__clientId: identityClientId
  IMAGES_CONTAINER: imagesContainerName
  RESULTS_CONTAINER: resultsContainerName
  CACHE_CONTAINER: cacheContainerName
  SCHEMAS_CONTAINER: schemasContainerName
  // The model: Entra ID (no VLM_API_KEY); AZURE_CLIENT_ID selects the user-assigned identity.
  VLM_ENDPOINT: vlmEndpoint
  VLM_DEPLOYMENT: vlmDeployment
  VLM_MODEL: vlmModel
  VLM_RPM: string(vlmRpm)
  VLM_TPM: string(vlmTpm)
  VLM_RATE_SPLIT: string(vlmRateSplit)
  VLM_RATE_PEERS: vlmRatePeers
  // The timer functions' schedules (%BATCH_SUBMIT_SCHEDULE% in their function.json): always set,
  // so the host indexes them; with no VLM_BATCH_DEPLOYMENT they find nothing to do.
  BATCH_SUBMIT_SCHEDULE: batchSubmitSchedule
  BATCH_COLLECT_SCHEDULE: batchCollectSchedule
  AZURE_CLIENT_ID: identityClientId
  // Telemetry with Entra ID ingestion (the component has local auth disabled).
  APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
}

var fallbackAppSettings = empty(vlmFallbackDeployments) ? {} : { VLM_FALLBACK_DEPLOYMENTS: vlmFallbackDeployments }

var batchAppSettings = empty(vlmBatchDeployment) ? {} : {
  VLM_BATCH_DEPLOYMENT: vlmBatchDeployment
  BATCH_ENQUEUED_TOKENS: string(batchEnqueuedTokens)
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': serviceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }

  resource appSettings 'config' = {
    name: 'appsettings'
    properties: union(baseAppSettings, fallbackAppSettings, batchAppSettings)
  }
}

output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
