import QCowImage

/// An error of a live source: libnbd, the NBD export, QMP or the fleecing workflow.
public struct LiveError: CodedError, Sendable {
    public var errorCode: QCowError.Code
    public var message: String
    /// QEMU's error class (`GenericError`, `DeviceNotFound`, …) for a failed QMP command.
    public var qmpClass: String?

    public init(_ code: QCowError.Code, _ message: String, qmpClass: String? = nil) {
        errorCode = code
        self.message = message
        self.qmpClass = qmpClass
    }

    public var description: String { message }
}
