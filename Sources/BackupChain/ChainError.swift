import QCowImage

/// An error of the backup repository layer.
public struct ChainError: CodedError, Sendable {
    public var errorCode: QCowError.Code
    public var message: String
    /// The repository folder or file the error is about.
    public var path: String?

    public init(_ code: QCowError.Code, _ message: String, path: String? = nil) {
        errorCode = code
        self.message = message
        self.path = path
    }

    public var description: String {
        path.map { "\($0): \(message)" } ?? message
    }
}
