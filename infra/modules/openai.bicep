// Azure OpenAI account (keyless: disableLocalAuth) with the primary vision deployment and,
// when asked for, a fallback deployment the app tries when the primary is throttled or down.
param name string
param location string
param tags object = {}
param skuName string = 'S0'

param deploymentName string
param modelName string
param modelVersion string
param deploymentSkuName string
param deploymentCapacity int

param deployFallback bool = false
param fallbackDeploymentName string = ''
param fallbackModelName string = ''
param fallbackModelVersion string = ''
param fallbackSkuName string = ''
param fallbackCapacity int = 0

// Global Batch (docs/batch.md): the same model as the primary, sku GlobalBatch; capacity is the
// deployment's enqueued-token quota, not a per-minute rate.
param deployBatch bool = false
param batchDeploymentName string = ''
param batchSkuName string = 'GlobalBatch'
param batchCapacity int = 0

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'OpenAI'
  sku: {
    name: skuName
  }
  properties: {
    customSubDomainName: name
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

resource primary 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = {
  parent: account
  name: deploymentName
  sku: {
    name: deploymentSkuName
    capacity: deploymentCapacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: modelName
      version: modelVersion
    }
    versionUpgradeOption: 'OnceCurrentVersionExpired'
  }
}

// Deployments on one account are created one at a time (parallel ones conflict).
resource fallback 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = if (deployFallback) {
  parent: account
  name: fallbackDeploymentName
  sku: {
    name: fallbackSkuName
    capacity: fallbackCapacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: fallbackModelName
      version: fallbackModelVersion
    }
    versionUpgradeOption: 'OnceCurrentVersionExpired'
  }
  dependsOn: [
    primary
  ]
}

resource batch 'Microsoft.CognitiveServices/accounts/deployments@2024-10-01' = if (deployBatch) {
  parent: account
  name: batchDeploymentName
  sku: {
    name: batchSkuName
    capacity: batchCapacity
  }
  properties: {
    model: {
      format: 'OpenAI'
      name: modelName
      version: modelVersion
    }
    versionUpgradeOption: 'OnceCurrentVersionExpired'
  }
  dependsOn: [
    primary
    fallback
  ]
}

output id string = account.id
output name string = account.name
output endpoint string = account.properties.endpoint
