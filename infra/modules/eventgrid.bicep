// Event Grid system topic for the storage account's events. The subscription that feeds the
// blob trigger is created after deployment by infra/hooks/postdeploy.*, because its webhook URL
// carries the blobs_extension system key, which only exists once the deployed host has started.
param name string
param location string
param tags object = {}
param storageAccountId string
param identityId string

resource systemTopic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    source: storageAccountId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output name string = systemTopic.name
