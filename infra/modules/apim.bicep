// Optional AI gateway (main.bicep: useApim): Azure API Management in front of Azure OpenAI.
//
//   function app ──Entra token (its user-assigned identity)──▶ APIM `openai` API
//     policy (infra/apim/policy.xml): validate-azure-ad-token ▶ llm-token-limit (one counter for
//     every instance) ▶ authentication-managed-identity ▶ backend pool (circuit breaker per member)
//   APIM ──its system-assigned identity──▶ Azure OpenAI endpoint(s)
//
// Only POST /openai/v1/chat/completions is exposed: the one call the app makes (shared/model.py).
// Sources (checked 2026-11-30): backends, pools and circuit breakers
// https://learn.microsoft.com/azure/api-management/backends and the resource reference
// https://learn.microsoft.com/azure/templates/microsoft.apimanagement/service/backends
param name string
param location string
param tags object = {}

@description('v2 tiers and the classic Developer/Basic/Standard/Premium tiers run llm-token-limit; Consumption does not.')
@allowed([
  'Developer'
  'BasicV2'
  'StandardV2'
  'PremiumV2'
  'Standard'
  'Premium'
])
param skuName string = 'BasicV2'
param skuCapacity int = 1
param publisherEmail string
param publisherName string

@description('Tenant of the app identity the gateway admits.')
param tenantId string
@description('Client id of the function app\'s user-assigned identity: the only caller the gateway admits.')
param appClientId string

@description('Azure OpenAI endpoints behind the gateway (https://NAME.openai.azure.com/), first one preferred; one per region or account.')
@minLength(1)
param openAiEndpoints array

@minValue(1)
@description('Tokens per minute the whole app may spend through the gateway, over every instance (llm-token-limit).')
param tokensPerMinute int

var poolName = 'vlm-openai-pool' // the backend-id in infra/apim/policy.xml

resource apim 'Microsoft.ApiManagement/service@2024-06-01-preview' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: skuName
    capacity: skuCapacity
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    publisherEmail: publisherEmail
    publisherName: publisherName
  }
}

// One backend per endpoint. Its circuit breaker opens on the first 429 or 5xx and stays open for
// as long as the endpoint's Retry-After says (acceptRetryAfter), else a minute; the pool then
// sends the calls to the other members.
resource members 'Microsoft.ApiManagement/service/backends@2024-06-01-preview' = [
  for (endpoint, i) in openAiEndpoints: {
    parent: apim
    name: 'vlm-openai-${i}'
    properties: {
      protocol: 'http'
      url: '${endsWith(endpoint, '/') ? endpoint : '${endpoint}/'}openai'
      circuitBreaker: {
        rules: [
          {
            name: 'throttled-or-failing'
            acceptRetryAfter: true
            tripDuration: 'PT1M'
            failureCondition: {
              count: 1
              interval: 'PT1M'
              statusCodeRanges: [
                {
                  min: 429
                  max: 429
                }
                {
                  min: 500
                  max: 599
                }
              ]
            }
          }
        ]
      }
    }
  }
]

// Priority pool: every call goes to the first endpoint while its breaker is closed, then to the next.
resource pool 'Microsoft.ApiManagement/service/backends@2024-06-01-preview' = {
  parent: apim
  name: poolName
  properties: {
    type: 'Pool'
    pool: {
      services: [
        for (endpoint, i) in openAiEndpoints: {
          id: members[i].id
          priority: i + 1
          weight: 1
        }
      ]
    }
  }
}

// Named values the policy reads as {{name}}.
resource tenantValue 'Microsoft.ApiManagement/service/namedValues@2024-06-01-preview' = {
  parent: apim
  name: 'vlm-tenant-id'
  properties: {
    displayName: 'vlm-tenant-id'
    value: tenantId
  }
}

resource clientValue 'Microsoft.ApiManagement/service/namedValues@2024-06-01-preview' = {
  parent: apim
  name: 'vlm-app-client-id'
  properties: {
    displayName: 'vlm-app-client-id'
    value: appClientId
  }
}

resource tpmValue 'Microsoft.ApiManagement/service/namedValues@2024-06-01-preview' = {
  parent: apim
  name: 'vlm-gateway-tpm'
  properties: {
    displayName: 'vlm-gateway-tpm'
    value: string(tokensPerMinute)
  }
}

// No subscription key: the caller proves who it is with its Entra token (validate-azure-ad-token).
resource api 'Microsoft.ApiManagement/service/apis@2024-06-01-preview' = {
  parent: apim
  name: 'openai'
  properties: {
    displayName: 'Azure OpenAI (vlm-functions)'
    path: 'openai'
    protocols: [
      'https'
    ]
    subscriptionRequired: false
  }
}

resource chatCompletions 'Microsoft.ApiManagement/service/apis/operations@2024-06-01-preview' = {
  parent: api
  name: 'chat-completions'
  properties: {
    displayName: 'Chat completions (v1)'
    method: 'POST'
    urlTemplate: '/v1/chat/completions'
  }
}

resource policy 'Microsoft.ApiManagement/service/apis/policies@2024-06-01-preview' = {
  parent: api
  name: 'policy'
  properties: {
    format: 'rawxml'
    value: loadTextContent('../apim/policy.xml')
  }
  // The named values and the pool must exist when the policy is saved.
  dependsOn: [
    tenantValue
    clientValue
    tpmValue
    pool
  ]
}

output name string = apim.name
output principalId string = apim.identity.principalId
// The app's VLM_ENDPOINT: the SDK appends /openai/v1/ (shared/model.py: base_url_for).
output gatewayUrl string = apim.properties.gatewayUrl
