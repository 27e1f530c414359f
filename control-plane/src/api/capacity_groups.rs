//! CapacityGroupService: create, update, get, list, delete Titus capacity groups.

use std::sync::Arc;

use titus_proto as pb;
use titus_proto::capacity_group_service_server::CapacityGroupService;
use tonic::{Request, Response, Status};

use super::client_deadline;
use crate::command::{Command, CommandResponse, Rejection, RejectionKind};
use crate::error::Error;
use crate::model::convert::{capacity_group_from_proto, capacity_group_to_proto};
use crate::model::validate_name;
use crate::replica::Replica;

pub struct CapacityGroupApi {
    pub replica: Arc<Replica>,
}

use crate::clock::now_ms;

fn expect_group(response: CommandResponse) -> Result<pb::CapacityGroup, Status> {
    match response {
        CommandResponse::CapacityGroup(g) => Ok(capacity_group_to_proto(g)),
        CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
        other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
    }
}

impl CapacityGroupApi {
    async fn read_barrier<T>(&self, request: &Request<T>, consistency: i32) -> Result<(), Status> {
        if consistency != pb::ReadConsistency::Stale as i32 {
            self.replica.read_barrier(client_deadline(request)).await?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl CapacityGroupService for CapacityGroupApi {
    async fn create_capacity_group(
        &self,
        request: Request<pb::CreateCapacityGroupRequest>,
    ) -> Result<Response<pb::CapacityGroup>, Status> {
        let deadline = client_deadline(&request);
        let name = request.get_ref().group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
        crate::auth::note_target(&request, format!("capacity group {name}"));
        let caller = crate::auth::caller(&request);
        let req = request.into_inner();
        let mut group = capacity_group_from_proto("group", req.group)?;
        // Timestamps are decided here, before proposing, so every replica applies the same value.
        group.create_time_ms = now_ms();
        group.update_time_ms = group.create_time_ms;
        let idempotency_token = Some(req.idempotency_token).filter(|t| !t.is_empty());
        if let Some(t) = &idempotency_token {
            if t.len() > 256 {
                return Err(Error::invalid("idempotency_token", "must be at most 256 characters").into());
            }
        }
        let idempotency_token = idempotency_token.map(|t| crate::auth::scoped(&caller, &t));
        let response =
            self.replica.propose(Command::CreateCapacityGroup { group, idempotency_token }, deadline).await?;
        Ok(Response::new(expect_group(response)?))
    }

    async fn update_capacity_group(
        &self,
        request: Request<pb::UpdateCapacityGroupRequest>,
    ) -> Result<Response<pb::CapacityGroup>, Status> {
        let deadline = client_deadline(&request);
        let name = request.get_ref().group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
        crate::auth::note_target(&request, format!("capacity group {name}"));
        let mut group = capacity_group_from_proto("group", request.into_inner().group)?;
        group.update_time_ms = now_ms();
        let response = self.replica.propose(Command::UpdateCapacityGroup { group }, deadline).await?;
        Ok(Response::new(expect_group(response)?))
    }

    async fn get_capacity_group(
        &self,
        request: Request<pb::GetCapacityGroupRequest>,
    ) -> Result<Response<pb::CapacityGroup>, Status> {
        let req = request.get_ref();
        validate_name("name", &req.name).map_err(|v| Error::InvalidArgument(vec![v]))?;
        self.read_barrier(&request, req.consistency).await?;
        let name = &request.get_ref().name;
        match self.replica.state.capacity_group(name)? {
            Some(g) => Ok(Response::new(capacity_group_to_proto(g))),
            None => Err(Error::Rejected(Rejection::new(
                RejectionKind::NotFound,
                "name",
                format!("capacity group {name:?} does not exist"),
            ))
            .into()),
        }
    }

    async fn list_capacity_groups(
        &self,
        request: Request<pb::ListCapacityGroupsRequest>,
    ) -> Result<Response<pb::ListCapacityGroupsResponse>, Status> {
        self.read_barrier(&request, request.get_ref().consistency).await?;
        let groups = self.replica.state.capacity_groups()?.into_iter().map(capacity_group_to_proto).collect();
        Ok(Response::new(pb::ListCapacityGroupsResponse { groups }))
    }

    async fn delete_capacity_group(
        &self,
        request: Request<pb::DeleteCapacityGroupRequest>,
    ) -> Result<Response<pb::DeleteCapacityGroupResponse>, Status> {
        let deadline = client_deadline(&request);
        crate::auth::note_target(&request, format!("capacity group {}", request.get_ref().name));
        let name = request.into_inner().name;
        validate_name("name", &name).map_err(|v| Error::InvalidArgument(vec![v]))?;
        match self.replica.propose(Command::DeleteCapacityGroup { name }, deadline).await? {
            CommandResponse::Done => Ok(Response::new(pb::DeleteCapacityGroupResponse {})),
            CommandResponse::Rejected(r) => Err(Error::Rejected(r).into()),
            other => Err(Status::internal(format!("unexpected apply result {other:?}"))),
        }
    }
}
