// Azure Monitor workbook and log alert rules over the service's OpenTelemetry data (issue 14).
//
// The workbook and the alerts query the Application Insights resource with its classic table names:
// OpenTelemetry metrics land in customMetrics (name = instrument name, customDimensions = its
// attributes; a histogram point carries valueSum/valueCount/valueMin/valueMax), INTERNAL and CLIENT
// spans in dependencies (span attributes in customDimensions). Source: the Azure Monitor
// OpenTelemetry exporter, https://github.com/Azure/azure-sdk-for-python/tree/main/sdk/monitor/azure-monitor-opentelemetry-exporter
// (export/metrics/_exporter.py, export/trace/_exporter.py); tables:
// https://learn.microsoft.com/azure/azure-monitor/reference/tables/appmetrics
// Every metric and attribute name in the queries is defined in shared/telemetry_names.py
// (tests/test_workbook.py checks it). The queries live in ../monitoring/ so tests can read them.
//
// Resource formats:
// https://learn.microsoft.com/azure/templates/microsoft.insights/workbooks (2023-06-01)
// https://learn.microsoft.com/azure/templates/microsoft.insights/2023-12-01/scheduledqueryrules
param applicationInsightsName string
param location string
param tags object = {}

@description('Action group resource ids notified by the alerts; empty: the alerts fire in the portal only.')
param actionGroupIds array = []

@minValue(1)
@description('Sustained-429 alert: fewest model calls per deployment in a 5-minute period for the share to count.')
param minModelCallsForThrottlingAlert int = 20

@description('Sustained-429 alert: share of model calls answered 429 (0-1, as a string because Bicep has no decimals) above which a period fails.')
param maxThrottledShare string = '0.2'

@minValue(1)
@description('Sustained-429 alert: consecutive failing 5-minute periods before it fires.')
param throttlingPeriods int = 3

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

// The workbook file is portable (no resource ids); this points its queries at our component.
var workbookResources = {
  fallbackResourceIds: [
    applicationInsights.id
  ]
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, applicationInsights.id, 'vlm-functions-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'vlm-functions: cost and behaviour'
    category: 'workbook'
    sourceId: applicationInsights.id
    serializedData: string(union(loadJsonContent('../monitoring/workbook.json'), workbookResources))
  }
}

// json() makes a non-number share fail the deployment instead of producing a broken query.
var throttlingTemplate = loadTextContent('../monitoring/alert-throttling.kql')
var throttlingWithCalls = replace(throttlingTemplate, '__MIN_MODEL_CALLS__', string(minModelCallsForThrottlingAlert))
var throttlingQuery = replace(throttlingWithCalls, '__MAX_THROTTLED_SHARE__', string(json(maxThrottledShare)))

resource throttlingAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'vlm-sustained-429-${applicationInsightsName}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'vlm-functions: sustained 429s from the model'
    description: 'More than maxThrottledShare of the model calls of a deployment were answered 429 in each of the last throttlingPeriods 5-minute periods. Raise the deployment capacity, lower VLM_TPM/VLM_RPM, or add a fallback deployment.'
    severity: 2
    enabled: true
    scopes: [
      applicationInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: throttlingQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          dimensions: [
            {
              name: 'deployment'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: throttlingPeriods
            minFailingPeriodsToAlert: throttlingPeriods
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'vlm-poison-record-${applicationInsightsName}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'vlm-functions: a blob ended as poison'
    description: 'The Functions host gave up on a blob after its retries; its .error.json in the results container says why.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsights.id
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: loadTextContent('../monitoring/alert-poison.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          dimensions: [
            {
              name: 'task'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

output workbookId string = workbook.id
output throttlingAlertName string = throttlingAlert.name
output poisonAlertName string = poisonAlert.name
