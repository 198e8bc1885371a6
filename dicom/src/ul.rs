//! The accepting side of the DICOM upper layer (PS3.8) as the SCP uses it: the
//! A-ASSOCIATE-RQ negotiated here, and the association it opens.
//!
//! dicom-ul's `ServerAssociationOptions` takes, for each presentation context, the first
//! transfer syntax the requestor lists that it supports, and has no hook for a preference: a
//! modality proposing JPEG-LS before Explicit VR Little Endian got JPEG-LS, which this build
//! stores but the pipeline cannot decode. dicom-ul's PDU types, reader and writer are used as
//! they are; what is written here is the negotiation itself (PS3.8 9.3.2–9.3.4 and PS3.7
//! D.3.3: protocol version, application context, AE titles, presentation contexts, maximum
//! length) and the few calls on an association that the SCP makes.

use bytes::BytesMut;
use dicom_ul::Pdu;
use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationAC, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderASCEReason, AssociationRJServiceUserReason, AssociationRJSource,
    AssociationRQ, DEFAULT_MAX_PDU, MAXIMUM_PDU_SIZE, PresentationContextNegotiated,
    PresentationContextResult, PresentationContextResultReason, UserVariableItem,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::sop;
use crate::spool::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

/// The DICOM application context name (PS3.7 A.2.1), the only one there is.
pub const APPLICATION_CONTEXT_NAME: &str = "1.2.840.10008.3.1.1.1";

/// An established association: the connection, what was read from it and not yet used, and
/// what was negotiated.
pub struct Association {
    socket: TcpStream,
    buf: BytesMut,
    contexts: Vec<PresentationContextNegotiated>,
    calling_ae: String,
    requestor_max_pdu_length: u32,
    write_buf: Vec<u8>,
}

impl Association {
    /// The connection and its read buffer (bytes received and not yet taken as PDUs).
    pub fn get_mut(&mut self) -> (&mut TcpStream, &mut BytesMut) {
        (&mut self.socket, &mut self.buf)
    }

    /// Every presentation context proposed, with its result.
    pub fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        &self.contexts
    }

    /// The calling AE title, as sent (without its padding).
    pub fn peer_ae_title(&self) -> &str {
        &self.calling_ae
    }

    /// The largest PDU the requestor takes (its variable field, PS3.8 D.1).
    pub fn requestor_max_pdu_length(&self) -> u32 {
        self.requestor_max_pdu_length
    }

    /// Writes one PDU.
    pub async fn send(&mut self, pdu: &Pdu) -> std::io::Result<()> {
        self.write_buf.clear();
        dicom_ul::write_pdu(&mut self.write_buf, pdu).map_err(std::io::Error::other)?;
        self.socket.write_all(&self.write_buf).await
    }

    /// Sends an A-ABORT (service provider, reason not specified) and closes the connection.
    pub async fn abort(mut self) -> std::io::Result<()> {
        let abort = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(
                AbortRQServiceProviderReason::ReasonNotSpecified,
            ),
        };
        self.send(&abort).await?;
        self.socket.shutdown().await
    }
}

/// What this node takes: its AE title, its maximum PDU length, who may associate, and the
/// abstract syntaxes it serves.
pub struct Acceptor<'a, A> {
    pub ae_title: &'a str,
    pub max_pdu_length: u32,
    pub access: &'a A,
    pub serves: &'a (dyn Fn(&str) -> bool + Sync),
}

/// A request not taken, with a short stable reason: rejected permanently (A-ASSOCIATE-RJ)
/// or aborted (A-ABORT).
#[derive(Debug)]
pub enum Refusal {
    Reject(AssociationRJSource, &'static str),
    Abort(AbortRQSource, &'static str),
}

impl Refusal {
    /// The PDU that answers the request.
    pub fn answer(&self) -> Pdu {
        match self {
            Refusal::Reject(source, _) => Pdu::AssociationRJ(AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: source.clone(),
            }),
            Refusal::Abort(source, _) => Pdu::AbortRQ {
                source: source.clone(),
            },
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Reject(_, reason) | Refusal::Abort(_, reason) => reason,
        }
    }
}

/// The answer to an A-ASSOCIATE-RQ that is accepted, and the association's terms.
#[derive(Debug)]
pub struct Accepted {
    pub answer: Pdu,
    pub contexts: Vec<PresentationContextNegotiated>,
    pub calling_ae: String,
    pub requestor_max_pdu_length: u32,
}

impl Accepted {
    /// The A-ASSOCIATE-AC to send, and the association on `socket`, whose read buffer holds
    /// `buf` (what followed the request).
    pub fn into_association(self, socket: TcpStream, buf: BytesMut) -> (Pdu, Association) {
        let association = Association {
            socket,
            buf,
            contexts: self.contexts,
            calling_ae: self.calling_ae,
            requestor_max_pdu_length: self.requestor_max_pdu_length,
            write_buf: Vec::new(),
        };
        (self.answer, association)
    }
}

fn rejected(source: AssociationRJSource, reason: &'static str) -> Refusal {
    Refusal::Reject(source, reason)
}

fn trim(value: &str) -> &str {
    value.trim_matches(|c: char| c == ' ' || c == '\0')
}

/// The transfer syntax this node prefers among `proposed`: the first of
/// [`sop::TRANSFER_SYNTAXES`] (kept in order of preference) that the requestor lists,
/// whatever the order of its list. `None` when it lists none this node stores.
pub fn preferred_transfer_syntax(proposed: &[String]) -> Option<&'static str> {
    sop::TRANSFER_SYNTAXES
        .iter()
        .copied()
        .find(|ts| proposed.iter().any(|p| trim(p) == *ts))
}

/// The smallest Maximum Length Received taken from a requestor: one PDV item of one byte.
pub const MIN_REQUESTOR_PDU: u32 = 7;

/// Negotiates an A-ASSOCIATE-RQ (PS3.8 9.3.2, PS3.7 D.3.3).
///
/// Rejected permanently: a protocol version without bit 0 (the only test PS3.8 allows, so a
/// field with more bits set is taken), another application context, a calling or called AE
/// title `access` refuses (compared without their space or NUL padding), and a request none
/// of whose presentation contexts can be taken (PS3.8 allows either answer; dcmtk's storescp
/// accepts such an association with every context refused, which can carry nothing). Aborted (PS3.8's AA-1: service-user source):
/// presentation context IDs that are even or repeated (PS3.8 9.3.2.2), which dicom-ul would
/// accept. Each context is accepted with the transfer syntax this node prefers among those
/// proposed ([`preferred_transfer_syntax`]), or refused with the reason PS3.8 9.3.3.2 gives.
/// SCP/SCU role selection and extended negotiation are not answered: the requestor is an SCU
/// with no extended behaviour (PS3.7 D.3.3.4–5), which is what this node serves.
pub fn negotiate<A: AccessControl>(
    acceptor: &Acceptor<'_, A>,
    rq: AssociationRQ,
) -> Result<Accepted, Refusal> {
    if rq.protocol_version & 1 == 0 {
        return Err(rejected(
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
            "protocol_version",
        ));
    }
    if trim(&rq.application_context_name) != APPLICATION_CONTEXT_NAME {
        return Err(rejected(
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
            "application_context",
        ));
    }
    let mut requestor_max_pdu_length = DEFAULT_MAX_PDU;
    let mut user_identity = None;
    for item in &rq.user_variables {
        match item {
            // 0: no limit (PS3.8 D.1); dicom-ul's reader and writer take at most this.
            UserVariableItem::MaxLength(0) => requestor_max_pdu_length = MAXIMUM_PDU_SIZE,
            UserVariableItem::MaxLength(len) => {
                requestor_max_pdu_length = (*len).min(MAXIMUM_PDU_SIZE)
            }
            UserVariableItem::UserIdentityItem(identity) => user_identity = Some(identity),
            _ => {}
        }
    }
    // A maximum length under one PDV item with one byte (its 4-byte length, the context id,
    // the message control header) cannot carry any answer: refused before anything is
    // stored (a red-team finding: a Maximum Length of 3 was accepted, the instance stored,
    // then the association aborted for want of room for its C-STORE-RSP).
    if requestor_max_pdu_length < MIN_REQUESTOR_PDU {
        return Err(rejected(
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
            "max_length",
        ));
    }
    // Without their padding: spaces (PS3.5 6.2), or NULs from some old implementations
    // (dicom-ul's reader leaves those).
    if let Err(reason) = acceptor.access.check_access(
        acceptor.ae_title,
        trim(&rq.calling_ae_title),
        trim(&rq.called_ae_title),
        user_identity,
    ) {
        let label = match reason {
            AssociationRJServiceUserReason::CalledAETitleNotRecognized => "called_ae",
            _ => "calling_ae",
        };
        return Err(rejected(AssociationRJSource::ServiceUser(reason), label));
    }
    let mut seen = [false; 256];
    for pc in &rq.presentation_contexts {
        if pc.id % 2 == 0 || std::mem::replace(&mut seen[pc.id as usize], true) {
            // An invalid PDU parameter in Sta2 (event 19): AA-1, service-user source.
            return Err(Refusal::Abort(AbortRQSource::ServiceUser, "context_ids"));
        }
    }
    let contexts: Vec<PresentationContextNegotiated> = rq
        .presentation_contexts
        .into_iter()
        .map(|pc| {
            let abstract_syntax = trim(&pc.abstract_syntax).to_owned();
            let (reason, transfer_syntax) = if !(acceptor.serves)(&abstract_syntax) {
                (
                    PresentationContextResultReason::AbstractSyntaxNotSupported,
                    None,
                )
            } else {
                match preferred_transfer_syntax(&pc.transfer_syntaxes) {
                    Some(ts) => (PresentationContextResultReason::Acceptance, Some(ts)),
                    None => (
                        PresentationContextResultReason::TransferSyntaxesNotSupported,
                        None,
                    ),
                }
            };
            PresentationContextNegotiated {
                id: pc.id,
                reason,
                // Not tested by the requestor when the context is refused (PS3.8 9.3.3.2);
                // dicom-ul and dcmtk send Implicit VR Little Endian there.
                transfer_syntax: transfer_syntax.unwrap_or(sop::IMPLICIT_VR_LE).to_owned(),
                abstract_syntax,
            }
        })
        .collect();
    if !contexts
        .iter()
        .any(|pc| pc.reason == PresentationContextResultReason::Acceptance)
    {
        return Err(rejected(
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
            "no_context",
        ));
    }
    let answer = Pdu::AssociationAC(AssociationAC {
        protocol_version: 1,
        // Returned as received, and not tested by the requestor (PS3.8 9.3.3).
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title,
        application_context_name: APPLICATION_CONTEXT_NAME.to_owned(),
        presentation_contexts: contexts
            .iter()
            .map(|pc| PresentationContextResult {
                id: pc.id,
                reason: pc.reason.clone(),
                transfer_syntax: pc.transfer_syntax.clone(),
            })
            .collect(),
        user_variables: vec![
            UserVariableItem::MaxLength(acceptor.max_pdu_length),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_owned()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_owned()),
        ],
    });
    Ok(Accepted {
        answer,
        contexts,
        calling_ae: trim(&rq.calling_ae_title).to_owned(),
        requestor_max_pdu_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    /// Refuses "STRANGER" and a called AE other than "NIGHTINGALE", comparing exactly.
    struct Anyone;
    impl AccessControl for Anyone {
        fn check_access(
            &self,
            _: &str,
            calling: &str,
            called: &str,
            _: Option<&dicom_ul::pdu::UserIdentity>,
        ) -> Result<(), AssociationRJServiceUserReason> {
            if calling == "STRANGER" {
                Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
            } else if called != "NIGHTINGALE" {
                Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
            } else {
                Ok(())
            }
        }
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT: &str = "1.2.840.10008.1.2";
    const JPEG_LS: &str = "1.2.840.10008.1.2.4.80";
    const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
    const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.70";

    fn rq(contexts: &[(u8, &str, &[&str])]) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "MODALITY".into(),
            called_ae_title: "NIGHTINGALE".into(),
            application_context_name: APPLICATION_CONTEXT_NAME.into(),
            presentation_contexts: contexts
                .iter()
                .map(|(id, abs, ts)| PresentationContextProposed {
                    id: *id,
                    abstract_syntax: (*abs).into(),
                    transfer_syntaxes: ts.iter().map(|t| (*t).into()).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    fn run(rq: AssociationRQ) -> Result<Accepted, Refusal> {
        let serves = |uid: &str| uid == CT;
        let acceptor = Acceptor {
            ae_title: "NIGHTINGALE",
            max_pdu_length: 65536,
            access: &Anyone,
            serves: &serves,
        };
        negotiate(&acceptor, rq)
    }

    fn rejection(result: Result<Accepted, Refusal>) -> (AssociationRJSource, &'static str) {
        match result {
            Err(refusal @ Refusal::Reject(..)) => {
                let Pdu::AssociationRJ(rj) = refusal.answer() else {
                    panic!("not an A-ASSOCIATE-RJ");
                };
                assert_eq!(rj.result, AssociationRJResult::Permanent);
                (rj.source, refusal.reason())
            }
            other => panic!("expected A-ASSOCIATE-RJ, got {other:?}"),
        }
    }

    #[test]
    fn the_preferred_transfer_syntax_wins_whatever_the_proposed_order() {
        let accepted = run(rq(&[
            (1, CT, &[JPEG_LS, JPEG_BASELINE, EXPLICIT]),
            (3, CT, &[JPEG_LS, JPEG_LOSSLESS]),
            (5, CT, &[JPEG_BASELINE, JPEG_LS]),
            (7, CT, &[JPEG_LS]),
            (9, CT, &[IMPLICIT, EXPLICIT]),
        ]))
        .unwrap();
        let chosen: Vec<&str> = accepted
            .contexts
            .iter()
            .map(|pc| pc.transfer_syntax.as_str())
            .collect();
        assert_eq!(
            chosen,
            [EXPLICIT, JPEG_LOSSLESS, JPEG_BASELINE, JPEG_LS, EXPLICIT]
        );
        assert!(
            accepted
                .contexts
                .iter()
                .all(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        );
        assert_eq!(accepted.requestor_max_pdu_length, 16384);
        let Pdu::AssociationAC(ac) = accepted.answer else {
            panic!("not an A-ASSOCIATE-AC");
        };
        assert_eq!(ac.presentation_contexts.len(), 5);
        assert!(
            ac.user_variables
                .contains(&UserVariableItem::MaxLength(65536))
        );
    }

    #[test]
    fn every_stored_transfer_syntax_is_ranked_once() {
        let mut seen = std::collections::HashSet::new();
        assert!(sop::TRANSFER_SYNTAXES.iter().all(|ts| seen.insert(*ts)));
        // Uncompressed first: the pipeline decodes them without a codec.
        assert_eq!(&sop::TRANSFER_SYNTAXES[..2], [EXPLICIT, IMPLICIT]);
    }

    #[test]
    fn contexts_are_refused_one_by_one_with_their_reason() {
        let accepted = run(rq(&[
            (1, CT, &["1.2.3.4"]),
            (3, "1.2.840.10008.5.1.4.1.2.2.1", &[EXPLICIT]),
            (5, CT, &[IMPLICIT]),
        ]))
        .unwrap();
        let reasons: Vec<_> = accepted
            .contexts
            .iter()
            .map(|pc| pc.reason.clone())
            .collect();
        assert_eq!(
            reasons,
            [
                PresentationContextResultReason::TransferSyntaxesNotSupported,
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                PresentationContextResultReason::Acceptance,
            ]
        );
    }

    #[test]
    fn a_request_with_nothing_to_take_is_rejected() {
        let (source, reason) = rejection(run(rq(&[(1, CT, &["1.2.3.4"])])));
        assert_eq!(
            source,
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven)
        );
        assert_eq!(reason, "no_context");
        let (_, reason) = rejection(run(rq(&[])));
        assert_eq!(reason, "no_context");
    }

    #[test]
    fn protocol_version_bit_zero_is_the_only_test() {
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.protocol_version = 0b11;
        assert!(run(request).is_ok());
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.protocol_version = 2;
        let (source, _) = rejection(run(request));
        assert_eq!(
            source,
            AssociationRJSource::ServiceProviderASCE(
                AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported
            )
        );
    }

    #[test]
    fn another_application_context_or_a_refused_ae_is_rejected() {
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.application_context_name = "1.2.3".into();
        let (source, _) = rejection(run(request));
        assert_eq!(
            source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported
            )
        );
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.calling_ae_title = "STRANGER".into();
        let (source, reason) = rejection(run(request));
        assert_eq!(
            source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized
            )
        );
        assert_eq!(reason, "calling_ae");
    }

    #[test]
    fn ae_titles_are_checked_without_their_padding() {
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.calling_ae_title = "MODALITY\0\0".into();
        request.called_ae_title = "NIGHTINGALE\0".into();
        let accepted = run(request).unwrap();
        assert_eq!(accepted.calling_ae, "MODALITY");
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.calling_ae_title = "STRANGER\0\0".into();
        let (_, reason) = rejection(run(request));
        assert_eq!(reason, "calling_ae");
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.called_ae_title = "OTHER\0".into();
        let (_, reason) = rejection(run(request));
        assert_eq!(reason, "called_ae");
    }

    #[test]
    fn even_or_repeated_context_ids_abort() {
        for ids in [[1u8, 1], [1, 2]] {
            let request = rq(&[(ids[0], CT, &[EXPLICIT]), (ids[1], CT, &[IMPLICIT])]);
            match run(request) {
                Err(refusal @ Refusal::Abort(..)) => {
                    assert!(matches!(refusal.answer(), Pdu::AbortRQ { .. }));
                    assert_eq!(refusal.reason(), "context_ids");
                }
                other => panic!("{ids:?}: expected an A-ABORT, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_requestor_maximum_length_is_kept_within_bounds() {
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.user_variables = vec![UserVariableItem::MaxLength(0)];
        assert_eq!(
            run(request).unwrap().requestor_max_pdu_length,
            MAXIMUM_PDU_SIZE
        );
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.user_variables.clear();
        assert_eq!(
            run(request).unwrap().requestor_max_pdu_length,
            DEFAULT_MAX_PDU
        );
        // Too small to carry any answer: rejected before anything can be stored.
        for len in [1, 3, 6] {
            let mut request = rq(&[(1, CT, &[EXPLICIT])]);
            request.user_variables = vec![UserVariableItem::MaxLength(len)];
            match run(request) {
                Err(refusal @ Refusal::Reject(..)) => assert_eq!(refusal.reason(), "max_length"),
                other => panic!("{len}: expected an A-ASSOCIATE-RJ, got {other:?}"),
            }
        }
        let mut request = rq(&[(1, CT, &[EXPLICIT])]);
        request.user_variables = vec![UserVariableItem::MaxLength(MIN_REQUESTOR_PDU)];
        assert_eq!(run(request).unwrap().requestor_max_pdu_length, 7);
    }
}
